"""`alignprog extract-features`: frame sampling, the network outputs, resume and bad videos.

Videos are written here with PyAV (the library extraction reads them with); the network has
random weights (seeded), so no download is needed. Inputs are 64x48: the network resizes to 224.
"""

from __future__ import annotations

import json
import urllib.error
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.data.extraction import ExtractSettings, extract_video, extract_videos, load_network
from alignprog.data.video import SampledFrames, find_videos, keep_frame, sampling_period
from alignprog.errors import AlignprogError, ConfigError, DataError

from helpers import stderr_of

runner = CliRunner()


def write_video(path: Path, num_frames: int, fps: int, *, width: int = 64, height: int = 48,
                codec: str = "mpeg4") -> Path:
    """Synthetic frames whose colour and a moving bar change with the frame number."""
    out = av.open(str(path), "w")
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(num_frames):
        img = np.zeros((height, width, 3), np.uint8)                  # (H, W, 3)
        img[..., 0] = (i * 7) % 256
        img[..., 2] = 255 - (i * 3) % 256
        img[:, : i % width, 1] = 200
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """a: 90 frames at 30 fps (3 s); b: 50 frames at 25 fps (2 s), in another container."""
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "a.mp4", 90, 30)
    write_video(d / "b.mkv", 50, 25)
    return d


@pytest.fixture(scope="module")
def net():
    return load_network("random")


# ------------------------------------------------------------------------------------------------
# Sampling rule (docs/data.md#feature-extraction): keep decoded frame c when floor(c mod h) == 0


def kept(num_decoded: int, h: Fraction) -> list[int]:
    """The decoded-frame indices `keep_frame` (the rule SampledFrames applies) keeps."""
    return [c for c in range(num_decoded) if keep_frame(c, h)]


def test_sampling_rule_by_hand():
    assert kept(90, sampling_period(30, 1)) == [0, 30, 60]
    assert kept(31, sampling_period(30, 2)) == [0, 15, 30]
    # h = 12.5: 13 mod 12.5 = 0.5 is kept, 12 and 26 (mod 1.0) are not.
    assert kept(51, sampling_period(25, 2)) == [0, 13, 25, 38, 50]
    # h = 7.5 (30 -> 4 fps): 12 of 90 frames.
    assert kept(31, sampling_period(30, 4)) == [0, 8, 15, 23, 30]
    # NTSC: h = 30000/1001 exactly; frame ceil(k h) is kept, and frame 30000 = 1001 h exactly.
    h = sampling_period(Fraction(30000, 1001), 1)
    assert kept(100, h) == [0, 30, 60, 90]
    assert keep_frame(30000, h) and not keep_frame(29999, h) and not keep_frame(30001, h)
    # Above the native rate every frame is kept once.
    assert kept(5, sampling_period(10, 25)) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError):
        sampling_period(30, 0)


@pytest.mark.parametrize("name, fps", [("a.mp4", 4), ("b.mkv", 2)])
def test_decoder_keeps_the_frames_of_the_rule(videos, name, fps):
    """SampledFrames yields exactly the decoded frames the rule keeps, in order."""
    with av.open(str(videos / name)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with SampledFrames(videos / name, fps) as reader:
        frames = list(reader)
    want = kept(len(every), reader.period)
    assert len(frames) == len(want)
    for got, c in zip(frames, want):
        np.testing.assert_array_equal(got, every[c])


@pytest.mark.parametrize("name, fps, expected", [
    ("a.mp4", 1, 3), ("a.mp4", 4, 12), ("b.mkv", 2, 4), ("b.mkv", 30, 50)])
def test_decoded_frame_counts(videos, name, fps, expected):
    with SampledFrames(videos / name, fps) as reader:
        frames = list(reader)
    assert len(frames) == expected
    assert frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert reader.decoded == (90 if name == "a.mp4" else 50)
    assert reader.native_fps == (30 if name == "a.mp4" else 25)


# ------------------------------------------------------------------------------------------------
# Network outputs


def _reference(path: Path, fps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Independently: decode every frame, keep the documented indices, torchvision's own resize and
    normalize, and torchvision's resnet50 run module by module, pooled by a plain mean."""
    from torchvision.transforms.v2 import functional as TF

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        all_frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        h = Fraction(stream.average_rate) / Fraction(fps)
    keep = [c for c in range(len(all_frames)) if int(c % h) == 0]   # floor(c mod h) == 0
    x = torch.from_numpy(np.stack([all_frames[c] for c in keep])).permute(0, 3, 1, 2)
    x = TF.resize(x.float() / 255, [224, 224], antialias=True)       # (T, 3, 224, 224)
    x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.manual_seed(0)                                              # load_network's seed
    m = torchvision.models.resnet50().eval()
    with torch.no_grad():
        y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        l3 = m.layer3(m.layer2(m.layer1(y)))                          # (T, 1024, 14, 14)
        pooled = m.layer4(l3).mean(dim=(2, 3))                        # (T, 2048)
    return l3, pooled


def test_outputs_equal_torchvision_layer3_and_pooled_layer4(videos, net):
    out = extract_video(videos / "a.mp4", net.network, fps=2, layouts=("features", "frames"),
                        batch_size=4, dtype="fp32")
    l3, pooled = _reference(videos / "a.mp4", 2)
    assert out.num_frames == 6 and out.decoded_frames == 90
    assert out.features.shape == (6, 2048) and out.features.dtype == np.float32
    assert out.frames.shape == (6, 1024, 14, 14) and out.frames.dtype == np.float32
    np.testing.assert_allclose(out.frames, l3.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out.features, pooled.numpy(), rtol=1e-4, atol=1e-3)
    # The pooled vector is the spatial mean of layer4 applied to the stored layer3 maps.
    l4 = net.network.layer4(torch.from_numpy(out.frames))
    np.testing.assert_allclose(out.features, l4.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-4)


def test_deterministic_and_batch_size_independent(videos, net):
    def run(batch_size: int):
        return extract_video(videos / "b.mkv", net.network, fps=2, layouts=("features",),
                             batch_size=batch_size, dtype="fp32").features
    first, again, one_by_one = run(3), run(3), run(1)
    assert first.shape == (4, 2048)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, one_by_one, rtol=1e-4, atol=1e-3)
    # A fresh network with the same seed gives the same numbers.
    other = extract_video(videos / "b.mkv", load_network("random").network, fps=2,
                          layouts=("features",), batch_size=3, dtype="fp32").features
    np.testing.assert_array_equal(first, other)


# ------------------------------------------------------------------------------------------------
# The command: layouts, manifest, resume, bad videos


def test_cli_writes_layouts_manifest_and_resumes(videos, tmp_path):
    root = tmp_path / "root"
    args = ["extract-features", str(videos), str(root), "--weights", "random", "--fps", "2",
            "--layout", "both", "--batch-size", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 extracted" in result.stdout
    a_feat, a_map = np.load(root / "features/a.npy"), np.load(root / "frames/a.npy")
    assert a_feat.shape == (6, 2048) and a_feat.dtype == np.float16
    assert a_map.shape == (6, 1024, 14, 14) and a_map.dtype == np.float16
    assert np.load(root / "features/b.npy").shape == (4, 2048)
    assert np.isfinite(a_feat.astype(np.float32)).all()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["settings"] == {"fps": 2.0, "weights": "random", "dtype": "fp16"}
    assert [(v["handle"], v["frames"], v["fps"], v["native_fps"], Path(v["source"]).name)
            for v in manifest["videos"]] == [("a", 6, 2.0, 30.0, "a.mp4"),
                                             ("b", 4, 2.0, 25.0, "b.mkv")]
    assert not list(root.rglob("*.tmp"))

    # Resume: nothing is recomputed or rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.npy")}
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 2, 0)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.npy")} == stamps

    # An interrupted run (arrays written, manifest not yet): the entry is rebuilt from the array.
    (root / "manifest.json").unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "manifest.json").read_text())
    assert [(v["handle"], v["frames"]) for v in manifest["videos"]] == [("a", 6), ("b", 4)]

    # Other settings on the same root are refused; --overwrite redoes every video.
    fps1 = [a if a != "2" else "1" for a in args]
    result = runner.invoke(app, fps1)
    assert result.exit_code == 2
    assert "--fps 2.0" in stderr_of(result) and "--overwrite" in stderr_of(result)
    result = runner.invoke(app, fps1 + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert np.load(root / "features/a.npy").shape == (3, 2048)
    assert json.loads((root / "manifest.json").read_text())["settings"]["fps"] == 1.0


def test_cli_reports_bad_videos_and_writes_the_others(videos, tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    (src / "a.mp4").write_bytes((videos / "a.mp4").read_bytes())
    (src / "garbage.mp4").write_bytes(b"this is not a video" * 50)
    (src / "empty.avi").write_bytes(b"")
    # An MP4 cut in half: its index (moov) is at the end, so it cannot be opened.
    data = (videos / "a.mp4").read_bytes()
    (src / "truncated.mp4").write_bytes(data[: len(data) // 2])
    root = tmp_path / "root"
    args = ["extract-features", str(src), str(root), "--weights", "random", "--fps", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    err = stderr_of(result)
    for name in ("garbage.mp4", "empty.avi", "truncated.mp4"):
        assert name in err
    assert "Traceback" not in result.output
    assert np.load(root / "features/a.npy").shape == (3, 2048)
    assert sorted(p.name for p in (root / "features").iterdir()) == ["a.npy"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert [v["handle"] for v in manifest["videos"]] == ["a"]
    assert [f["handle"] for f in manifest["failed"]] == ["empty", "garbage", "truncated"]
    # Once the bad files are gone, a second run has nothing left to fail on.
    for name in ("garbage.mp4", "empty.avi", "truncated.mp4"):
        (src / name).unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def test_find_videos(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("x.mp4", "y.MKV", "notes.txt", "sub/z.webm"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_videos(tmp_path)] == ["x.mp4", "y.MKV"]
    assert [p.name for p in find_videos(tmp_path, recursive=True)] == ["z.webm", "x.mp4",
                                                                       "y.MKV"]
    (tmp_path / "x.avi").write_bytes(b"")
    with pytest.raises(DataError, match="handle 'x'"):
        find_videos(tmp_path)
    result = runner.invoke(app, ["extract-features", str(tmp_path / "sub" / "none"),
                                 str(tmp_path / "out"), "--weights", "random"])
    assert result.exit_code == 1 and "no such file" in stderr_of(result)


# ------------------------------------------------------------------------------------------------
# Weights


def test_imagenet_weights_offline_give_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(AlignprogError, match="not in the torch hub cache") as info:
        load_network("imagenet")
    assert "resnet50-0676ba61.pth" in str(info.value) and "--weights" in str(info.value)


def test_local_weights_files(tmp_path, videos):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    ref = load_network("random").network
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x).pooled
        for name in ("w.safetensors", "w.pt"):
            loaded = load_network(str(tmp_path / name))
            assert name in loaded.description
            torch.testing.assert_close(loaded.network(x).pooled, expected)
    # Nothing is unpickled: a file holding an arbitrary object is refused.
    torch.save({"state_dict": state, "extra": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_network(str(tmp_path / "pickled.pt"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ConfigError, match="not ResNet-50 weights"):
        load_network(str(tmp_path / "r18.pt"))
    with pytest.raises(ConfigError, match="neither imagenet, random nor an existing file"):
        load_network(str(tmp_path / "missing.pt"))


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="--fps"):
        ExtractSettings(fps=0)
    with pytest.raises(ConfigError, match="--dtype"):
        ExtractSettings(dtype="bf16")
    with pytest.raises(ConfigError, match="layouts"):
        ExtractSettings(layouts=("pixels",))


def test_library_call_without_cli(videos, tmp_path, net):
    summary = extract_videos([videos / "b.mkv"], tmp_path / "r",
                             ExtractSettings(fps=1, layouts=("frames",), weights="random"),
                             net=net)
    assert [(v.handle, v.status, v.frames) for v in summary.videos] == [("b", "done", 2)]
    assert np.load(tmp_path / "r/frames/b.npy").shape == (2, 1024, 14, 14)
    assert not (tmp_path / "r/features").exists()


@pytest.mark.gpu
def test_cuda_matches_cpu(videos, net):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = extract_video(videos / "a.mp4", net.network, fps=2, layouts=("features", "frames"),
                        dtype="fp32")
    gpu_net = load_network("random", device="cuda").network
    gpu = extract_video(videos / "a.mp4", gpu_net, fps=2, layouts=("features", "frames"),
                        device="cuda", dtype="fp32")
    # cuDNN convolutions may use TF32 (PyTorch's default): about 3 decimal digits.
    for a, b in ((cpu.features, gpu.features), (cpu.frames, gpu.frames)):
        scale = np.abs(a).max()
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * scale)
