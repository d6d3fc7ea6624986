"""Checkpoints of the model hubs, written by their own tools, averaged whole, and loaded back
by the same tools: Hugging Face `save_pretrained` folders (single-file and sharded, float32
and bfloat16, tokenizer beside), a `Trainer` run's `checkpoint-N/` folders, PEFT LoRA
adapters, and KerasHub presets. Every value is the correctly rounded mean of the inputs
(within one ulp of the float64 average, as promised for any scheme); configs, tokenizers and
assets are the newest's bytes."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import correctly_rounded, ulp_distance

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
import hub_checkpoints as hub  # noqa: E402
import ml_dtypes  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from streamavg.cli import main  # noqa: E402

NOTE = "streamavg: note: "
TRAINING_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
)


# -- comparing ---------------------------------------------------------------------------------


def as_numpy(t) -> np.ndarray:
    """A tensor's values in numpy, bfloat16 as ml_dtypes' (its 16-bit integers unchanged)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def average(arrays: list[np.ndarray]) -> np.ndarray:
    """The equal average of arrays of one dtype, correctly rounded to that dtype (exact
    rational arithmetic, rounded once, ties to even): what streamavg promises for it."""
    assert len({(a.dtype, a.shape) for a in arrays}) == 1
    return correctly_rounded(np.stack(arrays), [1] * len(arrays), arrays[0].dtype)


def assert_correctly_rounded(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert (got.dtype, got.shape) == (want.dtype, want.shape), name
    assert ulp_distance(got, want) == 0, name


def weights_files(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder's safetensors files (a single file or the shards)."""
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = {n: as_numpy(t) for n, t in load_file(f).items()}
        assert not set(part) & set(tensors), f
        tensors |= part
    return tensors


def reference(folders: list[Path]) -> dict[str, np.ndarray]:
    """Each tensor of the folders' weights files, averaged in float64, of the stored dtype."""
    inputs = [weights_files(f) for f in folders]
    assert all(sorted(i) == sorted(inputs[-1]) for i in inputs)
    for name in inputs[-1]:  # the inputs differ: a copy of the newest cannot pass
        assert not np.array_equal(inputs[0][name], inputs[-1][name]), name
    return {name: average([i[name] for i in inputs]) for name in inputs[-1]}


def check_weights_files(out: Path, want: dict[str, np.ndarray]) -> None:
    got = weights_files(out)
    assert sorted(got) == sorted(want)
    for name, value in got.items():
        assert_correctly_rounded(value, want[name], name)


def check_loaded(model, want: dict[str, np.ndarray]) -> None:
    """Every parameter and state_dict entry of a loaded model within one ulp of `want`;
    an entry the files do not hold (a tied head) is the very tensor of one they hold."""
    state = model.state_dict()
    stored = {state[n].data_ptr(): n for n in want}
    for name, tensor in state.items():
        source = name if name in want else stored.get(tensor.data_ptr())
        assert source is not None, f"{name}: neither in the files nor tied to a tensor there"
        assert_correctly_rounded(as_numpy(tensor), want[source], name)
    for name, p in model.named_parameters(remove_duplicate=False):
        source = name if name in want else stored[p.data_ptr()]
        assert_correctly_rounded(as_numpy(p), want[source], name)


def names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same_bytes(out: Path, newest: Path, files: list[str]) -> None:
    for name in files:
        assert (out / name).read_bytes() == (newest / name).read_bytes(), name


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(NOTE)]


# -- Hugging Face save_pretrained folders --------------------------------------------------------

PRETRAINED = {  # case -> (architecture, max_shard_size, bfloat16)
    "gpt2": ("gpt2", None, False),
    "gpt2-sharded": ("gpt2", "50KB", False),
    "llama-bf16": ("llama", None, True),
    "llama-bf16-sharded": ("llama", "20KB", True),
}
CONFIGS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> dict[str, list[Path]]:
    """case -> its checkpoint-N/ folders, oldest first (see hub.write_pretrained):
    config.json, generation_config.json, model.safetensors or model.safetensors.index.json
    with model-0000K-of-00003.safetensors, tokenizer.json, tokenizer_config.json."""
    root = tmp_path_factory.mktemp("pretrained")
    made = {}
    for case, (arch, shard, bf16) in PRETRAINED.items():
        made[case] = hub.write_pretrained(root / case, arch, shard=shard, bf16=bf16)
        if shard is not None:  # the fixture is what it claims to be
            assert len(list(made[case][-1].glob("model-*-of-*.safetensors"))) in (2, 3)
    return made


@pytest.mark.parametrize("case", PRETRAINED)
def test_pretrained_folders_average_into_a_folder_from_pretrained_loads(
    pretrained, tmp_path, capsys, case
):
    folders = pretrained[case]
    newest = folders[-1]
    out = tmp_path / "avg"
    code = main([*map(str, folders), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert out.is_dir()
    assert names(out) == names(newest)  # the newest's layout: same files, same shards
    want = reference(folders)
    check_weights_files(out, want)
    model = AutoModelForCausalLM.from_pretrained(out)
    check_loaded(model, want)
    # generation_config.json differs between the checkpoints: the newest's bytes
    assert len({(f / "generation_config.json").read_bytes() for f in folders}) == 3
    assert_same_bytes(out, newest, CONFIGS)
    if (newest / "model.safetensors.index.json").exists():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        newest_index = json.loads((newest / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == newest_index["weight_map"]


@pytest.mark.parametrize("case", ["gpt2", "gpt2-sharded"])
def test_tied_weights_stay_tied(pretrained, tmp_path, capsys, case):
    """GPT-2 stores its embedding once, as transformer.wte.weight; lm_head is that tensor."""
    folders = pretrained[case]
    out = tmp_path / "avg"
    assert main([*map(str, folders), "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    stored = weights_files(out)
    assert "transformer.wte.weight" in stored
    assert "lm_head.weight" not in stored
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    want = reference(folders)["transformer.wte.weight"]
    assert_correctly_rounded(as_numpy(model.lm_head.weight), want, "lm_head.weight")


@pytest.mark.parametrize("case", ["gpt2", "llama-bf16-sharded"])
def test_pretrained_default_output_is_a_folder_beside_them(pretrained, tmp_path, capsys, case):
    """A folder of checkpoint-N/ folders: the default output is
    averaged/checkpoint-NEWEST.avg-equal-n3/, ordered by N (1000 after 200)."""
    parent = tmp_path / case
    for f in pretrained[case]:
        shutil.copytree(f, parent / f.name)
    code = main([str(parent), "-q"])
    assert code == 0, capsys.readouterr().err
    out = parent / "averaged" / "checkpoint-1000.avg-equal-n3"
    assert out.is_dir()
    want = reference([parent / f.name for f in pretrained[case]])
    check_loaded(AutoModelForCausalLM.from_pretrained(out), want)


# -- a Trainer run ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trainer_runs(tmp_path_factory) -> dict[int, Path]:
    """gradient accumulation steps -> a Trainer run's output_dir: checkpoint-2/ .. checkpoint-8/
    (update steps; each config.json, generation_config.json, model.safetensors, optimizer.pt,
    rng_state.pth, scheduler.pt, tokenizer.json, tokenizer_config.json, trainer_state.json,
    training_args.bin) and, from trainer.save_model(), the final model.safetensors,
    config.json, generation_config.json, tokenizer files and training_args.bin."""
    root = tmp_path_factory.mktemp("trainer")
    runs = {
        k: hub.write_trainer_run(root / f"acc{k}", max_steps=8, save_steps=2, accumulation=k)
        for k in (1, 2)
    }
    for run in runs.values():
        assert sorted(p.name for p in run.glob("checkpoint-*")) == [
            f"checkpoint-{n}" for n in (2, 4, 6, 8)
        ]
        state = json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())
        assert state["global_step"] == 8
    return runs


def test_trainer_run_averages_its_last_three_checkpoints(trainer_runs, tmp_path, capsys):
    run = Path(shutil.copytree(trainer_runs[1], tmp_path / "run"))
    code = main([str(run), "--last", "3", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    out = run / "averaged" / "checkpoint-8.avg-equal-n3"
    assert out.is_dir()
    chosen = [run / f"checkpoint-{n}" for n in (4, 6, 8)]
    want = reference(chosen)
    final = weights_files(run)  # the final model alone is not the average
    assert any(not np.array_equal(final[n], want[n]) for n in want)
    check_weights_files(out, want)
    check_loaded(AutoModelForCausalLM.from_pretrained(out), want)
    for name in TRAINING_STATE:
        assert not (out / name).exists(), name
    assert names(out) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", *CONFIGS[2:]]
    )
    assert_same_bytes(out, chosen[-1], CONFIGS)
    assert notes(err) == [
        f"{NOTE}{run}: averaging the checkpoint folders in it (checkpoint-2, ...), not the "
        "model saved in the folder itself (name the folders to choose otherwise)"
    ], err


def test_trainer_run_with_gradient_accumulation_is_named_by_update_steps(
    trainer_runs, tmp_path, capsys
):
    """Two micro-batches an update: checkpoint-8 is update 8 (batch 16); the name follows."""
    run = Path(shutil.copytree(trainer_runs[2], tmp_path / "run"))
    code = main([str(run), "--last", "2", "-q"])
    assert code == 0, capsys.readouterr().err
    out = run / "averaged" / "checkpoint-8.avg-equal-n2"
    assert sorted(p.name for p in (run / "averaged").iterdir()) == [out.name]
    want = reference([run / "checkpoint-6", run / "checkpoint-8"])
    check_loaded(AutoModelForCausalLM.from_pretrained(out), want)


# -- PEFT LoRA adapters -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> list[Path]:
    """adapter-N/ folders, oldest first: README.md, adapter_config.json,
    adapter_model.safetensors (lora_A and lora_B of q_proj and v_proj, both layers)."""
    pytest.importorskip("peft")
    return hub.write_lora(tmp_path_factory.mktemp("lora"))


def test_lora_adapters_average_and_peft_loads_them(adapters, tmp_path, capsys):
    from peft import PeftModel, get_peft_model_state_dict

    newest = adapters[-1]
    out = tmp_path / "avg"
    code = main([*map(str, adapters), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert names(out) == names(newest)
    want = reference(adapters)
    assert {n.split(".")[-2] for n in want} == {"lora_A", "lora_B"}
    check_weights_files(out, want)
    model = PeftModel.from_pretrained(hub.lora_base(), out)
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(want)
    for name, tensor in loaded.items():
        assert_correctly_rounded(as_numpy(tensor), want[name], name)
    assert_same_bytes(out, newest, ["adapter_config.json", "README.md"])
    assert notes(err) == [
        f"{NOTE}LoRA adapters: A and B are averaged each on its own, and the product of the "
        "averages is not the average of the updates B·A (average merged weights for that)"
    ], err


# -- KerasHub presets ---------------------------------------------------------------------------

KERAS_CONFIGS = {  # case -> the files the output takes whole from the newest
    "backbone": ["config.json", "metadata.json"],
    "task": [
        "config.json",
        "metadata.json",
        "task.json",
        "preprocessor.json",
        "tokenizer.json",
        "assets/tokenizer/vocabulary.txt",
    ],
    "sharded": ["config.json", "metadata.json"],
    "bf16": ["config.json", "metadata.json"],
}


@pytest.fixture(scope="session")
def keras_presets(tmp_path_factory) -> dict[str, list[tuple[Path, Path]]]:
    """case -> [(preset-N/, its weights dump)], oldest first. Each preset holds
    config.json, metadata.json and model.weights.h5 (sharded: model.weights.json and
    model_0000K.weights.h5, K < 3); the task's also task.json, task.weights.h5,
    preprocessor.json, tokenizer.json and assets/tokenizer/vocabulary.txt."""
    for package in ("keras_hub", "jax"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    return hub.write_keras_hub(tmp_path_factory.mktemp("keras_hub"))


@pytest.fixture(scope="session")
def keras_averaged(keras_presets, tmp_path_factory) -> dict[str, tuple[int, str, Path, str]]:
    """case -> (exit status, stderr, output, error loading it) of averaging its three presets
    with `-o`, each output loaded by from_preset (one subprocess for all)."""
    root = tmp_path_factory.mktemp("keras_hub_averaged")
    runs, jobs = {}, {}
    for case, presets in keras_presets.items():
        out = root / case
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([*(str(p) for p, _ in presets), "-o", str(out), "-q"])
        runs[case] = (code, err.getvalue(), out)
        if code == 0:
            jobs[case] = (out, root / f"{case}.npz")
    errors = hub.load_keras_hub(jobs) if jobs else {}
    return {case: (*run, errors.get(case, "")) for case, run in runs.items()}


@pytest.mark.parametrize("case", hub.KERAS_CASES)
def test_keras_hub_presets_average_and_from_preset_loads_them(keras_presets, keras_averaged, case):
    presets = keras_presets[case]
    code, err, out, load_error = keras_averaged[case]
    assert code == 0, err
    assert out.is_dir()
    assert load_error == ""
    newest = presets[-1][0]
    assert names(out) == names(newest)
    inputs = [hub.keras_weights(dump) for _, dump in presets]
    got = hub.keras_weights(out.parent / f"{case}.npz")
    assert [p for p, _ in got] == [p for p, _ in inputs[-1]]
    if case == "task":  # the classifier head, in task.weights.h5, is averaged too
        assert {"logits/kernel", "logits/bias"} <= {p for p, _ in got}
    for i, (path, value) in enumerate(got):
        values = [ws[i][1] for ws in inputs]
        assert not np.array_equal(values[0], values[-1]), path  # the inputs differ
        assert_correctly_rounded(value, average(values), path)
    assert len({(p / "config.json").read_bytes() for p, _ in presets}) == 3  # "name"s differ
    assert_same_bytes(out, newest, KERAS_CONFIGS[case])
    if case == "sharded":
        manifest = json.loads((out / "model.weights.json").read_text())
        newest_manifest = json.loads((newest / "model.weights.json").read_text())
        assert manifest["weight_map"] == newest_manifest["weight_map"]
