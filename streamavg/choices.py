"""The values of the options that take a choice, kept apart from the code that uses them so
that the command line can build its parser (`-h`, `-V`) without importing numpy."""

SCHEMES = ("equal", "linear", "exp")  # how checkpoints are weighed (see schemes.py)
OPTIMIZER_POLICIES = ("drop", "newest")  # optimizer state: dropped, or the newest's
INTEGER_POLICIES = ("equal", "newest")  # integer tensors: required equal, or the newest's
COMPANION_POLICIES = ("equal", "newest")  # config, tokenizer: required equal, or the newest's
MODES = ("auto", "min", "max")  # whether lower or higher metric values are better
