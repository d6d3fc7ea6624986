"""The files that give weights their meaning (a model's config, its vocabularies) are
compared across real checkpoints: the same model passes, a different one is refused."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import pytest
from conftest import files

from streamavg.cli import main
from streamavg.companions import check_companions
from streamavg.engine import open_all
from streamavg.errors import StreamavgError
from streamavg.formats.base import Reader

REFUSED = (
    "; the weights would be averaged across different models "
    "(pass companions='newest' to take the newest's)"
)
TEXTS = (  # three runs' training texts: ten words each, different vocabularies
    ["the cat sat on the mat", "a dog ran far away"],
    ["the dog sat on a log", "my cat ran far away"],
    ["one two three four five", "six seven eight nine ten"],
)


@contextmanager
def opened(paths: Sequence[Path]) -> Iterator[list[Reader]]:
    """The checkpoints opened as a run opens them (the older ones settled), newest last."""
    with ExitStack() as stack:
        yield open_all(paths, stack)


def mlp(activation: str) -> keras.Model:
    """Dense(8, activation), then Dense(2): the same shapes whatever the activation."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation=activation), keras.layers.Dense(2)]
    )


def vectorizer(texts: list[str]) -> keras.Model:
    """A text classifier whose TextVectorization layer was adapted on `texts`, built as a
    fresh process builds it (the same layer names each time)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    vectorize = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=4)
    vectorize.adapt(texts)
    inputs = keras.Input((1,), dtype="string")
    x = keras.layers.Embedding(20, 4)(vectorize(inputs))
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(x)))


@pytest.mark.parametrize("case", ["k3-keras", "k3-h5"])
def test_checkpoints_of_one_model_pass(checkpoints, case):
    with opened(files(checkpoints / case)[-3:]) as cks:
        assert check_companions(cks) == []
        assert check_companions(cks, "newest") == []


def test_a_keras_archive_shows_its_config_metadata_and_assets(tmp_path):
    vectorizer(TEXTS[0]).save(tmp_path / "model.keras")
    with opened([tmp_path / "model.keras"]) as (ck,):
        found = [(c.name, c.role, c.json) for c in ck.companions()]
        data = {c.name: b"".join(c.chunks()) for c in ck.companions()}
        assert [c.size for c in ck.companions()] == [len(d) for d in data.values()]
    assert found == [
        ("assets/layers/text_vectorization/_lookup_layer/vocabulary.txt", "meaning", False),
        ("assets/layers/text_vectorization/vocabulary.txt", "meaning", False),
        ("config.json", "meaning", True),
        ("metadata.json", "meaning", True),
    ]
    words = b"\n[UNK]\nthe\nsat\nran\non\nmat\nfar\ndog\ncat\naway\na"  # the mask token first
    assert data["assets/layers/text_vectorization/vocabulary.txt"] == words


def test_a_different_activation_is_refused_naming_the_config_key(tmp_path, capsys):
    mlp("relu").save(tmp_path / "model_1.keras")
    mlp("tanh").save(tmp_path / "model_2.keras")
    older, newest = tmp_path / "model_1.keras", tmp_path / "model_2.keras"

    assert main([str(older), str(newest), "-o", str(tmp_path / "avg.keras")]) == 1
    why = (
        f'{older}: config.json: config.layers[1].config.activation is "relu" here, "tanh" '
        f"(in {newest}); the weights would be averaged across different models (pass "
        "--companions newest to take the newest's)"
    )
    assert capsys.readouterr().err == f"streamavg: error: {why}\n"
    assert not (tmp_path / "avg.keras").exists()
    with opened([older, newest]) as cks:
        assert check_companions(cks, "newest") == [
            f"config.json differs in {older}: taken from the newest, {newest}"
        ]


def test_different_vocabularies_are_refused_naming_the_asset(tmp_path):
    paths = [tmp_path / f"run_{i}.keras" for i in range(3)]
    for texts, path in zip(TEXTS, paths, strict=True):
        vectorizer(texts).save(path)
    with opened(paths) as cks, pytest.raises(StreamavgError) as e:
        check_companions(cks)
    lookup = "assets/layers/text_vectorization/_lookup_layer/vocabulary.txt"
    assert str(e.value) == f"{paths[0]}: {lookup}: 44 bytes here, 55 (in {paths[2]}){REFUSED}"


def test_a_legacy_model_config_is_compared_without_layer_names(tmp_path):
    mlp("relu").save(tmp_path / "relu.h5")
    mlp("tanh").save(tmp_path / "tanh.h5")
    with (
        opened([tmp_path / "relu.h5", tmp_path / "tanh.h5"]) as cks,
        pytest.raises(StreamavgError) as e,
    ):
        check_companions(cks)
    assert str(e.value) == (
        f'{tmp_path / "relu.h5"}: model_config: config.layers[1].config.activation is "relu" '
        f'here, "tanh" (in {tmp_path / "tanh.h5"}){REFUSED}'
    )

    keras.backend.clear_session()
    mlp("relu").save(tmp_path / "first.h5")  # layers dense, dense_1
    mlp("relu").save(tmp_path / "second.h5")  # layers dense_2, dense_3
    with opened([tmp_path / "first.h5", tmp_path / "second.h5"]) as (first, second):
        assert not first.h5  # settled, its HDF5 handle closed: model_config is read again
        assert [c.name for c in first.companions()] == ["model_config"]
        assert check_companions([first, second]) == []


def functional(activation: str) -> keras.Model:
    """`mlp` as a functional model: its config names layers in values too (inbound nodes)."""
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation=activation)(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def test_a_functional_model_built_twice_in_one_process_is_one_model(tmp_path):
    keras.backend.clear_session()
    functional("relu").save(tmp_path / "first.h5")  # input_layer, dense, dense_1
    functional("relu").save(tmp_path / "second.h5")  # input_layer_1, dense_2, dense_3
    functional("tanh").save(tmp_path / "third.h5")
    with opened([tmp_path / "first.h5", tmp_path / "second.h5"]) as cks:
        assert check_companions(cks) == []
    with (
        opened([tmp_path / "first.h5", tmp_path / "third.h5"]) as cks,
        pytest.raises(StreamavgError) as e,
    ):
        check_companions(cks)
    assert str(e.value) == (
        f'{tmp_path / "first.h5"}: model_config: config.layers[1].config.activation is "relu" '
        f'here, "tanh" (in {tmp_path / "third.h5"}){REFUSED}'
    )


def test_a_layer_frozen_then_fine_tuned_is_one_model(tmp_path):
    model = mlp("relu")
    model.layers[0].trainable = False
    model.save(tmp_path / "model_1.keras")
    model.layers[0].trainable = True
    model.save(tmp_path / "model_2.keras")
    with opened([tmp_path / "model_1.keras", tmp_path / "model_2.keras"]) as cks:
        assert check_companions(cks) == []
