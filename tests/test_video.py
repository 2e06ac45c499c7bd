import re
import subprocess

import imageio.v3 as iio
import numpy as np
import pytest

from lipsync import video as V
from lipsync.audio import load_audio


def numbered_frames(n, h=48, w=64):
    """Frames that are easy to tell apart after lossy coding: a gradient plus a per-frame brightness step."""
    grad = np.linspace(0, 60, w)[None, :, None] + np.linspace(0, 40, h)[:, None, None]
    return np.stack([np.clip(grad + 7 * k, 0, 255).repeat(3, axis=2) for k in range(n)]).astype(np.uint8)


def streams(path):
    """The 'Stream #...' lines of `ffmpeg -i` (imageio-ffmpeg ships no ffprobe)."""
    err = subprocess.run([V.ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return [line.strip() for line in err.splitlines() if line.strip().startswith("Stream #")]


def assert_same_frames(decoded, original):
    assert len(decoded) == len(original)
    err = np.abs(decoded[:, None].astype(np.float32) - original[None].astype(np.float32)).mean(axis=(2, 3, 4))
    assert (err.argmin(axis=1) == np.arange(len(original))).all()  # frame k comes back as frame k
    assert err.diagonal().max() < 3.0


@pytest.mark.parametrize("fps", [30.0, 12.5])
def test_write_read_roundtrip_is_frame_accurate_with_aac_audio(tmp_path, fps):
    frames = numbered_frames(23)
    wave = np.sin(np.arange(16000 * 3) / 5.0).astype(np.float32)  # longer than the video: must be trimmed
    n = V.write_video(tmp_path / "a.mp4", frames, fps, audio=wave)
    decoded, fps_read = V.read_video(tmp_path / "a.mp4")
    assert n == 23 and fps_read == fps
    assert_same_frames(decoded, frames)
    lines = streams(tmp_path / "a.mp4")
    assert any("Video: h264" in s and "yuv420p" in s for s in lines)
    assert any(re.search(r"Audio: aac.*16000 Hz, mono", s) for s in lines)
    audio = load_audio(tmp_path / "a.mp4")
    assert abs(len(audio) - 23 / fps * 16000) <= 1


def test_short_audio_is_padded_to_video_length(tmp_path):
    V.write_video(tmp_path / "a.mp4", numbered_frames(20), 25.0, audio=np.ones(1000, np.float32) * 0.5)
    audio = load_audio(tmp_path / "a.mp4")
    assert len(audio) == 20 * 640
    assert audio[-3000:].abs().max() < 1e-3  # the padding is silence


def test_audio_from_a_file_path_is_muxed(tmp_path):
    import soundfile as sf
    sf.write(tmp_path / "a.wav", np.sin(np.arange(48000) / 9.0) * 0.3, 48000)
    V.write_video(tmp_path / "a.mp4", numbered_frames(10), 25.0, audio=tmp_path / "a.wav")
    assert V.video_info(tmp_path / "a.mp4").has_audio
    assert len(load_audio(tmp_path / "a.mp4")) == 10 * 640


def test_replace_audio_keeps_the_picture_bit_exact_and_puts_the_new_sound_under_it(tmp_path):
    frames = numbered_frames(25)
    tone = (0.3 * np.sin(np.arange(16000) / 5.0)).astype(np.float32)
    V.write_video(tmp_path / "a.mp4", frames, 25.0, audio=tone)
    late = np.concatenate([np.zeros(8000, np.float32), tone])  # the same tone half a second later, 1.5 s long
    V.replace_audio(tmp_path / "a.mp4", late, tmp_path / "b.mp4", seconds=1.0)
    a, _ = V.read_video(tmp_path / "a.mp4")
    b, fps = V.read_video(tmp_path / "b.mp4")
    assert fps == 25.0 and np.array_equal(a, b)  # the picture is copied, not re-encoded
    sound = load_audio(tmp_path / "b.mp4").numpy()
    assert abs(len(sound) - 16000) <= 1  # trimmed to the picture's second
    assert np.abs(sound[:7000]).max() < 1e-2 and np.abs(sound[9000:]).max() > 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]  # no temporary left behind


def test_odd_size_is_padded_by_one_edge_pixel(tmp_path):
    frames = numbered_frames(5, h=33, w=47)
    V.write_video(tmp_path / "odd.mp4", frames, 25.0)
    decoded, _ = V.read_video(tmp_path / "odd.mp4")
    assert decoded.shape == (5, 34, 48, 3)
    assert_same_frames(decoded[:, :33, :47], frames)
    assert np.abs(decoded[:, 33].astype(int) - decoded[:, 32]).mean() < 3  # replicated edge, not black


def test_video_without_audio_stream_raises_clear_error(tmp_path):
    V.write_video(tmp_path / "mute.mp4", numbered_frames(5), 25.0)
    assert not V.video_info(tmp_path / "mute.mp4").has_audio
    with pytest.raises(ValueError, match="has no audio stream"):
        load_audio(tmp_path / "mute.mp4")


def test_failed_write_leaves_old_file_and_no_temp_files(tmp_path):
    out = tmp_path / "v.mp4"
    V.write_video(out, numbered_frames(4), 25.0)
    before = out.read_bytes()
    bad = list(numbered_frames(4)) + [np.zeros((10, 10, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame 4"):
        V.write_video(out, bad, 25.0, audio=np.zeros(16000, np.float32))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_iter_frames_streams_the_same_frames_as_read_video(tmp_path):
    V.write_video(tmp_path / "a.mp4", numbered_frames(12), 25.0)
    frames, _ = V.read_video(tmp_path / "a.mp4")
    streamed = list(V.iter_frames(tmp_path / "a.mp4"))
    assert np.array_equal(np.stack(streamed), frames)
    streamed[0][0, 0] = 0  # writeable


def test_resample_indices_pick_the_frame_nearest_in_time():
    for src, dst, n in [(30.0, 25.0, 90), (12.5, 25.0, 40), (25.0, 25.0, 17), (60.0, 25.0, 121), (23.976, 25, 50)]:
        idx = V.resample_indices(n, src, dst)
        assert len(idx) == round(n * dst / src)
        t_out, t_src = np.arange(len(idx)) / dst, idx / src
        assert np.abs(t_out - t_src).max() <= 0.5 / src + 1e-9
        assert (np.diff(idx) >= 0).all() and idx.max() <= n - 1
    assert V.resample_indices(5, 12.5, 25.0).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert V.resample_indices(6, 30.0, 25.0).tolist() == [0, 1, 2, 4, 5]


def test_select_frames_streams_fancy_indexing():
    frames = numbered_frames(9)
    idx = V.resample_indices(9, 12.5, 30.0)
    assert np.array_equal(np.stack(list(V.select_frames(iter(frames), idx))), frames[idx])
    assert np.array_equal(V.resample_frames(frames, 12.5, 30.0), frames[idx])
    with pytest.raises(ValueError, match="only 9 frames"):
        list(V.select_frames(iter(frames), [0, 9]))


def test_read_image_converts_rgba_and_grey_to_rgb(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128  # half transparent red
    iio.imwrite(tmp_path / "a.png", rgba)
    over_black = V.read_image(tmp_path / "a.png")
    over_white = V.read_image(tmp_path / "a.png", background="white")
    assert over_black.shape == (4, 5, 3) and over_black.dtype == np.uint8
    assert tuple(over_black[0, 0]) == (100, 0, 0)
    assert tuple(over_white[0, 0]) == (227, 127, 127)
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    iio.imwrite(tmp_path / "g.png", grey)
    out = V.read_image(tmp_path / "g.png")
    assert out.shape == (4, 5, 3) and (out == grey[..., None]).all()
    iio.imwrite(tmp_path / "c.jpg", np.full((8, 8, 3), 90, np.uint8))
    assert np.abs(V.read_image(tmp_path / "c.jpg").astype(int) - 90).max() <= 2


def test_load_audio_averages_channels_and_resamples_to_16k(tmp_path):
    import soundfile as sf
    t = np.arange(48000) / 48000
    left, right = 0.6 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 220 * t)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), 48000, subtype="FLOAT")
    wave = load_audio(tmp_path / "st.wav").numpy()
    assert len(wave) == 16000
    expected = 0.4 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)
    assert np.abs(wave[100:-100] - expected[100:-100]).max() < 0.01
