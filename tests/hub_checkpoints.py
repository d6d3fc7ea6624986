"""Checkpoint folders written by the real tools of the model hubs, for tests/test_hub.py.

Hugging Face `save_pretrained` folders (single-file and sharded, float32 and bfloat16, with a
tokenizer beside), a `Trainer` run's `checkpoint-N/` folders, PEFT LoRA adapters, and
KerasHub presets (backbone, task, sharded, bfloat16). Everything is built from tiny configs
on the CPU, offline: tokenizers come from a local vocabulary, nothing from a hub.

KerasHub runs in a subprocess on the JAX backend (`python hub_checkpoints.py keras-build
ROOT` and `python hub_checkpoints.py keras-load JOBS.json`): the test process may already
hold Keras on TensorFlow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

STEPS = (100, 200, 1000)  # 1000 sorts before 200 as text: the order must come from the numbers
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(27)]  # 32
HERE = Path(__file__).parent


# -- Hugging Face ------------------------------------------------------------------------------


def tokenizer():
    """A `PreTrainedTokenizerFast` over a local WordLevel vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        model_max_length=32,
    )
    return fast


def tiny_model(arch: str, seed: int = 0):
    """A tiny causal LM built from a config: GPT-2 ties its head to the embedding, the
    Llama here does not."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=len(WORDS),
            n_positions=32,
            bos_token_id=2,
            eos_token_id=3,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def perturb(model, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter, so that each checkpoint differs everywhere."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            p.add_(noise.to(p.dtype))


def write_pretrained(root: Path, arch: str, *, shard: str | None, bf16: bool) -> list[Path]:
    """root/checkpoint-N/ for N in STEPS, oldest first: `save_pretrained` of one model
    perturbed further at each step (in bfloat16 if `bf16`), `max_shard_size=shard`, with a
    tokenizer beside. As in one run, config.json and the tokenizer are the same in every
    checkpoint; generation_config.json (taken from the newest unread) differs."""
    import torch

    model = tiny_model(arch)
    if bf16:
        model.to(torch.bfloat16)
    folders = []
    for i, step in enumerate(STEPS):
        perturb(model, seed=step)
        model.generation_config.max_length = 20 + i
        folder = root / f"checkpoint-{step}"
        kwargs = {} if shard is None else {"max_shard_size": shard}
        model.save_pretrained(folder, **kwargs)
        tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders


def dataset(n: int, length: int = 8, seed: int = 0) -> list[dict]:
    """`n` examples of random token ids, each its own label (causal LM)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(WORDS), (n, length), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def write_trainer_run(
    output_dir: Path, *, max_steps: int, save_steps: int, accumulation: int = 1
) -> Path:
    """A `Trainer` run of a tiny GPT-2: checkpoint-N/ every `save_steps` update steps, then
    `trainer.save_model()` (the final model, in `output_dir` itself)."""
    from transformers import Trainer, TrainingArguments

    batch = 2
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_model("gpt2"),
        args=args,
        train_dataset=dataset(max_steps * batch * accumulation),
        processing_class=tokenizer(),
    )
    trainer.train()
    trainer.save_model()
    return output_dir


LORA_TARGETS = ["q_proj", "v_proj"]


def lora_base():
    """The base model of the adapters: the same tiny Llama every time."""
    return tiny_model("llama", seed=1)


def write_lora(root: Path) -> list[Path]:
    """root/adapter-N/ for N in STEPS: PEFT `save_pretrained` of LoRA adapters (A and B
    both perturbed, so that they differ, B from its zeros too); one adapter_config.json."""
    import torch
    from peft import LoraConfig, get_peft_model

    folders = []
    for step in STEPS:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
        model = get_peft_model(lora_base(), config)
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        folder = root / f"adapter-{step}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


# -- KerasHub (in a subprocess, on JAX) --------------------------------------------------------

KERAS_CASES = ("backbone", "task", "sharded", "bf16")
KERAS_SHARD_GB = 1e-5  # about 10 kB: the tiny backbone (~30 kB) in several shards


def _keras_env() -> dict[str, str]:
    return {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "HF_HUB_OFFLINE": "1",
    }


def _keras(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__)), *args],
        env=_keras_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}")


def write_keras_hub(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """root/CASE/preset-N/ for each of KERAS_CASES and N in STEPS, oldest first, each with
    its weights as the tool held them when saving, in root/dumps/CASE-N.npz (see
    `keras_weights`): case -> [(preset, dump)]."""
    _keras("keras-build", str(root))
    return {case: [_keras_paths(root, case, step) for step in STEPS] for case in KERAS_CASES}


def _keras_paths(root: Path, case: str, step: int) -> tuple[Path, Path]:
    return root / case / f"preset-{step}", root / "dumps" / f"{case}-{step}.npz"


def load_keras_hub(jobs: dict[str, tuple[Path, Path]]) -> dict[str, str]:
    """Load each preset of `jobs` (name -> (preset, npz)) with `from_preset` in one
    subprocess, writing its weights to the npz; name -> the error of those that failed."""
    spec = Path(next(iter(jobs.values()))[1]).parent / "jobs.json"
    spec.write_text(json.dumps({k: [str(p), str(n)] for k, (p, n) in jobs.items()}))
    _keras("keras-load", str(spec))
    return json.loads(spec.with_suffix(".errors.json").read_text())


def keras_weights(npz: Path) -> list[tuple[str, np.ndarray]]:
    """A dump's weights, in the model's order: (path, array of the stored dtype)."""
    import ml_dtypes

    with np.load(npz) as f:
        meta = json.loads(str(f["__meta__"]))
        out = []
        for i, (path, dtype) in enumerate(meta):
            bits = f[f"w{i}"]
            dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
            out.append((path, bits.view(dt)))
    return out


def _dump(model, npz: Path) -> None:
    import keras

    arrays, meta = {}, []
    for i, v in enumerate(model.weights):
        a = np.asarray(keras.ops.convert_to_numpy(v.value))
        meta.append([v.path, str(a.dtype)])
        arrays[f"w{i}"] = a.view(f"u{a.dtype.itemsize}")
    np.savez(npz, __meta__=json.dumps(meta), **arrays)


def _keras_build(root: Path) -> None:
    import keras
    import keras_hub

    def backbone(dtype: str | None, name: str):
        return keras_hub.models.BertBackbone(
            vocabulary_size=len(WORDS),
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            max_sequence_length=16,
            dtype=dtype,
            name=name,
        )

    for case in KERAS_CASES:
        for step in STEPS:
            keras.utils.set_random_seed(step)  # each checkpoint its own weights
            folder, dump = _keras_paths(root, case, step)
            # Each save names its layers anew (as Keras numbers them in a process): the
            # JSON files differ in their "name" keys only, which say nothing of the weights.
            name = f"{case}_{step}"
            if case == "task":
                tok = keras_hub.models.BertTokenizer(vocabulary=WORDS, name=f"tok_{name}")
                pre = keras_hub.models.BertTextClassifierPreprocessor(
                    tok, sequence_length=16, name=f"pre_{name}"
                )
                model = keras_hub.models.BertTextClassifier(
                    backbone(None, f"bert_{name}"), num_classes=3, preprocessor=pre, name=name
                )
            else:
                model = backbone("bfloat16" if case == "bf16" else None, f"bert_{name}")
            rng = np.random.default_rng(step)  # ones and zeros too (norms, biases) differ
            for v in model.weights:
                noise = rng.standard_normal(tuple(v.shape)) * 0.05
                v.assign(v + keras.ops.cast(noise, v.dtype))
            shard = KERAS_SHARD_GB if case == "sharded" else 10
            model.save_to_preset(str(folder), max_shard_size=shard)
            dump.parent.mkdir(exist_ok=True)
            _dump(model, dump)


def _keras_load(spec: Path) -> None:
    import keras_hub

    errors = {}
    for name, (preset, npz) in json.loads(spec.read_text()).items():
        try:
            if (Path(preset) / "task.json").exists():
                model = keras_hub.models.TextClassifier.from_preset(preset)
            else:  # from_preset loads in float32 unless given the dtype: the stored one
                config = json.loads((Path(preset) / "config.json").read_text())["config"]
                dtype = config["dtype"]["config"]["name"]
                model = keras_hub.models.Backbone.from_preset(preset, dtype=dtype)
            _dump(model, Path(npz))
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    spec.with_suffix(".errors.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    if sys.argv[1] == "keras-build":
        _keras_build(Path(sys.argv[2]))
    elif sys.argv[1] == "keras-load":
        _keras_load(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
