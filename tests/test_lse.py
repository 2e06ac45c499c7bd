"""lipsync.tools.lse / mfcc: the public SyncNet's LSE-D / LSE-C, checked without the real weights.

The oracles: the layer list of joonson/syncnet_python's SyncNetModel.py re-stated below, python_speech_features for
the MFCC, hand computations for the offset search and the scores, scipy for the median filter."""

import itertools

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn

from lipsync.tools import eval as E
from lipsync.tools import lse as L
from lipsync.tools.mfcc import mfcc
from lipsync.video import iter_frames, write_video
from media import SPEECH, VIDEO


def original_s():
    """SyncNetModel.py's S(num_layers_in_fc_layers=1024), layer by layer as published."""
    m = nn.Module()
    m.netcnnaud = nn.Sequential(
        nn.Conv2d(1, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
        nn.Conv2d(64, 192, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.BatchNorm2d(192),
        nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
        nn.Conv2d(192, 384, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
        nn.Conv2d(256, 512, kernel_size=(5, 4), padding=(0, 0)), nn.BatchNorm2d(512), nn.ReLU())
    m.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024))
    m.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024))
    m.netcnnlip = nn.Sequential(
        nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0), nn.BatchNorm3d(96), nn.ReLU(inplace=True),
        nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
        nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(256),
        nn.ReLU(inplace=True), nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
        nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
        nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
        nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
        nn.Conv3d(256, 512, kernel_size=(1, 6, 6), padding=0), nn.BatchNorm3d(512), nn.ReLU(inplace=True))
    return m


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(original module in eval mode, path of its random state dict saved as the 2018 file is: no
    num_batches_tracked)."""
    torch.manual_seed(0)
    m = original_s()
    sd = m.state_dict()
    for k, v in sd.items():  # non-trivial BatchNorm statistics, so that running stats must land in the right place
        if k.endswith("running_mean"):
            v.copy_(torch.randn_like(v) * 0.1)
        elif k.endswith("running_var") or (k.endswith("weight") and v.dim() == 1):
            v.copy_(torch.rand_like(v) + 0.5)
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    return m.eval(), path


def test_random_weights_under_the_published_names_load_strictly(published):
    m, path = published
    net = L.load_syncnet_v2(path)
    assert not net.training
    theirs, ours = m.state_dict(), net.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    sd = torch.load(path, weights_only=True)
    sd.update({k: v for k, v in theirs.items() if k.endswith("num_batches_tracked")})  # a newer save loads too
    torch.save(sd, path.with_name("with_counts.model"))
    L.load_syncnet_v2(path.with_name("with_counts.model"))


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.pop("netcnnlip.1.running_var"), "1 missing (e.g. netcnnlip.1.running_var)"),
    (lambda sd: sd.update({"netcnnaud.21.weight": torch.zeros(3)}), "1 unexpected (e.g. netcnnaud.21.weight)"),
    (lambda sd: sd.update({"netfcaud.3.weight": torch.zeros(512, 512)}), "1 misshaped (e.g. netfcaud.3.weight"),
], ids=["missing", "extra", "misshaped"])
def test_a_missing_extra_or_misshaped_key_is_one_clear_error(published, tmp_path, change, words):
    sd = torch.load(published[1], weights_only=True)
    change(sd)
    torch.save(sd, tmp_path / "bad.model")
    with pytest.raises(L.CheckpointError) as e:
        L.load_syncnet_v2(tmp_path / "bad.model")
    assert words in str(e.value) and "\n" not in str(e.value)


class Code:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("kind, words", [("missing", "checkpoint not found"), ("garbage", "cannot read checkpoint"),
                                         ("code", "a file that needs code to load is refused")])
def test_the_cli_rejects_a_missing_garbage_or_code_file_in_one_error_line(tmp_path, kind, words, capsys):
    path = tmp_path / "syncnet_v2.model"
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "code":
        torch.save({"netcnnaud.0.weight": Code()}, path)
    with pytest.raises(SystemExit) as e:
        E.main(["--lse", "--syncnet-weights", str(path), "any.mp4"])
    msg = str(e.value)
    assert msg.startswith("error: ") and words in msg and "\n" not in msg
    assert "this ran" not in capsys.readouterr().out


def test_the_towers_equal_the_original_layer_list(published):
    m, path = published
    net = L.load_syncnet_v2(path)
    torch.manual_seed(1)
    lips, mfccs = torch.rand(2, 3, 5, 224, 224) * 255, torch.randn(3, 1, 13, 20) * 10
    with torch.no_grad():
        ref_lip = m.netfclip(m.netcnnlip(lips).view(2, -1))
        ref_aud = m.netfcaud(m.netcnnaud(mfccs).view(3, -1))
        lip, aud = net.forward_lip(lips), net.forward_aud(mfccs)
    assert lip.shape == (2, 1024) and aud.shape == (3, 1024)
    torch.testing.assert_close(lip, ref_lip, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aud, ref_aud, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- MFCC


def speech_int16():
    wave, sr = sf.read(SPEECH, dtype="int16")
    assert sr == 16000
    return wave[:16000 * 6]


def quiet():
    x = np.round(np.random.default_rng(0).normal(0, 2, 16000)).astype(np.int16)  # a few int16 steps, some exact 0
    x[:800] = 0
    return x


@pytest.mark.parametrize("name, signal", [("speech", speech_int16), ("zeros", lambda: np.zeros(16000, np.int16)),
                                          ("quiet", quiet), ("short", lambda: np.zeros(399, np.int16))])
def test_mfcc_equals_python_speech_features(name, signal):
    psf = pytest.importorskip("python_speech_features", reason="the MFCC oracle (requirements-dev.txt) is missing")
    x = signal()
    ours, theirs = mfcc(x), psf.mfcc(x, 16000)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_mfcc_of_silence_is_log_eps_energy_and_flat_cepstrum():
    """Known without the oracle: zero power -> float eps everywhere, so c0 = log(eps) and the DCT of a constant."""
    out = mfcc(np.zeros(16000))
    assert out.shape == (1 + int(np.ceil((16000 - 400) / 160)), 13)
    np.testing.assert_allclose(out[:, 0], np.log(np.finfo(float).eps))
    np.testing.assert_allclose(out[:, 1:], 0, atol=1e-9)


# ----------------------------------------------------------------------------- protocol


def test_scores_of_a_small_distance_table_by_hand():
    # 4 windows x 3 shifts (vshift 1): column means 2.0, 1.25, 2.75 -> minimum 1.25 at index 1 (offset 0), median 2
    d = torch.tensor([[2.0, 1.0, 3.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 1.0, 3.0]])
    assert L.sync_scores(d, vshift=1) == {"offset": 0, "lse_d": 1.25, "lse_c": 0.75}
    # means 1.5, 2.75, 1.0 -> minimum at index 2: offset 1 - 2 = -1; median 1.5
    d = torch.tensor([[1.0, 3.0, 1.0], [2.0, 2.5, 1.0]])
    assert L.sync_scores(d, vshift=1) == {"offset": -1, "lse_d": 1.0, "lse_c": 0.5}


def test_calc_pdist_equals_the_per_frame_loop():
    rng = np.random.default_rng(0)
    lip, aud = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    got = L.calc_pdist(torch.tensor(lip), torch.tensor(aud), vshift=3).numpy()
    padded = np.concatenate([np.zeros((3, 4)), aud, np.zeros((3, 4))])
    want = [[np.linalg.norm(lip[i] - padded[i + j] + 1e-6) for j in range(7)] for i in range(7)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


class ShiftedStub(nn.Module):
    """Embeddings built to match at a known shift: audio window -> its 13 x 20 MFCC values; lip window starting at
    frame i (its pixel value) -> the MFCC values of audio window i - k (zeros where there is no window i - k)."""

    def __init__(self, cc, k, windows):
        super().__init__()
        self.cc, self.k, self.windows, self.dummy = cc, k, windows, nn.Parameter(torch.zeros(1))

    def forward_aud(self, x):
        return x.flatten(1)

    def forward_lip(self, x):
        out = []
        for first in x[:, 0, 0, 0, 0].long().tolist():
            a = first - self.k
            out.append(self.cc[:, 4 * a:4 * a + 20].flatten() if 0 <= a < self.windows else torch.zeros(260))
        return torch.stack(out)


@pytest.mark.parametrize("k", [3, -2])
def test_the_offset_search_finds_a_known_shift_and_lse_d_matches_by_hand(k):
    n = 48
    wave = sf.read(SPEECH, dtype="float32")[0][:n * 640]
    cc = torch.from_numpy(mfcc(L.to_int16(wave)).T).float()  # (13, T)
    crops = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 224, 224, 3))
    res = L.lse(ShiftedStub(cc, k, n - 5), crops, wave, batch_size=7)
    assert res["offset"] == k and res["windows"] == n - 5

    w = n - 5  # by hand: lip i ~ audio i - k, distances to every audio window 15 either side (zeros past the ends)
    aud = [cc[:, 4 * i:4 * i + 20].flatten().numpy() for i in range(w)]
    lip = [aud[i - k] if 0 <= i - k < w else np.zeros(260) for i in range(w)]
    table = np.array([[np.linalg.norm(lip[i] - (aud[i + s] if 0 <= i + s < w else 0) + 1e-6) for s in range(-15, 16)]
                      for i in range(w)])
    means = table.mean(0)
    assert np.argmin(means) == 15 - k
    assert res["lse_d"] == pytest.approx(means.min(), rel=1e-5, abs=1e-6)
    assert res["lse_c"] == pytest.approx(np.median(means) - means.min(), rel=1e-5)


class Recorder(nn.Module):
    """Keeps what the network is fed; constant embeddings."""

    def __init__(self):
        super().__init__()
        self.dummy, self.lips, self.mfccs = nn.Parameter(torch.zeros(1)), [], []

    def forward_lip(self, x):
        self.lips.append(x)
        return torch.zeros(len(x), 4)

    def forward_aud(self, x):
        self.mfccs.append(x)
        return torch.zeros(len(x), 4)


def test_the_network_sees_bgr_0_255_frames_and_mfcc_of_int16_samples():
    """As syncnet_python feeds it: cv2.imread's BGR values as floats, MFCC of wavfile.read's int16 values."""
    n = 8
    crops = np.zeros((n, 224, 224, 3), np.uint8)
    crops[..., 0], crops[..., 1], crops[..., 2] = 10, 20, 30  # RGB
    wave = sf.read(SPEECH, dtype="float32")[0][16000:16000 + n * 640]
    rec = Recorder()
    L.lse(rec, crops, wave)
    lips, mfccs = torch.cat(rec.lips), torch.cat(rec.mfccs)
    assert lips.shape == (3, 3, 5, 224, 224) and mfccs.shape == (3, 1, 13, 20)
    assert [float(lips[:, c].unique()) for c in range(3)] == [30.0, 20.0, 10.0]
    int16 = sf.read(SPEECH, dtype="int16")[0][16000:16000 + n * 640]
    cc = mfcc(int16).T
    for v in range(3):
        np.testing.assert_allclose(mfccs[v, 0].numpy(), cc[:, 4 * v:4 * v + 20], rtol=1e-6, atol=1e-5)


def test_30_fps_frames_are_resampled_to_25_by_nearest_time():
    frames = np.arange(30)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    out, idx = L.to_25fps(frames, 30.0)
    assert len(out) == 25 and list(idx) == [round(1.2 * j) for j in range(25)]
    assert np.array_equal(out[:, 0, 0, 0], idx)
    same, idx = L.to_25fps(frames, 25.0)
    assert np.array_equal(same, frames) and list(idx) == list(range(30))


def test_crop_follows_run_pipeline_geometry_with_grey_outside():
    yy, xx = np.mgrid[0:100, 0:120]
    frame = np.stack([yy, xx, (yy + xx) % 256], -1).astype(np.uint8)
    # s = 20: rows y - s .. y + 1.8 s, columns x - 1.4 s .. x + 1.4 s: 56 x 56, so a 56 px crop is not resized
    assert np.array_equal(L.syncnet_crop(frame, 50, 50, 20, size=56), frame[30:86, 22:78])
    left = L.syncnet_crop(frame, 10, 50, 20, size=56)  # columns -18 .. 37
    assert np.all(left[:, :18] == 110) and np.array_equal(left[:, 18:], frame[30:86, 0:38])


def test_box_smoothing_is_scipy_medfilt():
    signal = pytest.importorskip("scipy.signal")
    x = np.random.default_rng(0).normal(100, 5, 40)
    np.testing.assert_array_equal(L.medfilt(x), signal.medfilt(x, 13))


def test_cli_scores_a_30_fps_video_with_its_track_and_prints_the_average(published, tmp_path, capsys, one_thread):
    n = 36  # 1.2 s at 30 fps -> 30 frames at 25 fps -> 25 windows
    frames = np.stack(list(itertools.islice(iter_frames(VIDEO), n)))
    wave = sf.read(SPEECH, dtype="float32")[0][:n * 16000 // 30]
    video = tmp_path / "talk.mp4"
    write_video(str(video), frames, 30.0, audio=wave)
    with np.load(VIDEO.with_name("demo.track.npz")) as t:
        np.savez(tmp_path / "talk.track.npz", **{k: t[k][:n] for k in t.files})
    res = E.main(["--lse", "--syncnet-weights", str(published[1]), str(video), str(video)])
    out = capsys.readouterr().out
    row = res["videos"][0]
    assert row["frames"] == 30 and row["windows"] == 25 and -15 <= row["offset"] <= 15
    assert np.isfinite(row["lse_d"]) and row["lse_c"] >= 0 and res["lse_d"] == pytest.approx(row["lse_d"])
    assert "resampled to 25 fps" in out and "average of 2" in out and "LSE-D" in out
