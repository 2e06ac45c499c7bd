"""The web page (python -m lipsync.app) in a real browser: Debian's headless Chromium driven by selenium.

One app process for the module. Offline: the page may request nothing, and the server connect to or look up nothing,
beyond 127.0.0.1 (no fonts, scripts or telemetry from elsewhere). LIPSYNC_APP_SCREENSHOT=docs/app.png saves the
README's screenshot (else it goes to tmp).
"""

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from imageio_ffmpeg import get_ffmpeg_exe

import infer
from lipsync import app
from lipsync.video import video_info

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
RUN_TIMEOUT = 300  # s for the demo's 175 frames: ~15 s on an idle 2-core box, several times that on a busy one


OFFLINE = """
import runpy, sys
LOCAL = ("127.0.0.1", "::1", "localhost", None)
def guard(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL \\
            or event == "socket.getaddrinfo" and args[0] not in LOCAL:
        print("LEFT THE MACHINE:", event, args[1:] if event == "socket.connect" else args[:2], file=sys.stderr)
sys.addaudithook(guard)
sys.argv[0] = "lipsync.app"
runpy.run_module("lipsync.app", run_name="__main__", alter_sys=True)
"""  # python -m lipsync.app, reporting any connection or name lookup beyond this machine (Python's audit hooks)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(the page's URL, the results folder, its log) of `python -m lipsync.app` started from the repository root."""
    results, port = tmp_path_factory.mktemp("app_results"), free_port()
    log = open(tmp_path_factory.mktemp("app_log") / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", OFFLINE, "--port", str(port), "--results", str(results)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            log.seek(0)
            assert proc.poll() is None and time.time() < deadline, f"the app did not start:\n{log.read()}"
            time.sleep(0.5)
    yield url, results, Path(log.name)
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), "apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, until, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(until)


def requested_urls(driver):
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def status_line(driver):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, "#status textarea, #status input").get_attribute("value")


def load_example(driver, speech=None):
    """The demo example in the form, then another speech file if given."""
    from selenium.webdriver.common.by import By

    def speech_is(name):  # the speech's download link names the file
        return lambda d: any(a.get_attribute("href").endswith("/" + name)
                             for a in d.find_elements(By.CSS_SELECTOR, "#speech a[data-testid=download-link]"))
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#example [data-testid='dataset-cell-0-0']")).click()
    wait(driver, lambda d: "demo.mp4" in d.find_element(By.ID, "face").text.replace("\n", ""))
    wait(driver, speech_is("demo.wav"))
    if speech:
        driver.find_element(By.CSS_SELECTOR, "#speech button[aria-label='Clear']").click()
        wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#speech input[type=file]")).send_keys(str(speech))
        wait(driver, speech_is(speech.name))


def test_page_dubs_the_demo_example_and_plays_it_with_sound_offline(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    url, results, log = server
    browser.get(url)
    load_example(browser)
    browser.find_element(By.ID, "run").click()
    video = wait(browser, lambda d: [v for v in d.find_elements(By.CSS_SELECTOR, "#result video")
                                     if v.get_attribute("src")], RUN_TIMEOUT)[0]
    assert status_line(browser).startswith("done in ")
    browser.execute_script("arguments[0].muted = true; arguments[0].play();", video)
    wait(browser, lambda d: d.execute_script("return arguments[0].currentTime > 0.5 && !arguments[0].paused;", video),
         30)
    duration = browser.execute_script("return arguments[0].duration;", video)
    assert abs(duration - sf.info(ROOT / "assets" / "demo.wav").duration) < 0.1
    browser.execute_script("arguments[0].pause(); arguments[0].currentTime = 3.5;", video)
    time.sleep(0.5)
    screenshot = Path(os.environ.get("LIPSYNC_APP_SCREENSHOT") or tmp_path / "app.png")
    browser.save_screenshot(str(screenshot))

    served = tmp_path / "served.mp4"
    served.write_bytes(urllib.request.urlopen(video.get_attribute("src")).read())
    probe = subprocess.run([get_ffmpeg_exe(), "-hide_banner", "-i", str(served)], capture_output=True, text=True)
    streams = [line for line in probe.stderr.splitlines() if line.strip().startswith("Stream #")]
    assert any(" Video: h264" in s for s in streams) and any(" Audio: aac" in s for s in streams), probe.stderr
    assert len(list(Path(results).glob("*/demo_demo.mp4"))) == 1  # in the run's own folder

    outside = [u for u in requested_urls(browser) if not u.startswith((url, "data:", "blob:"))]
    assert outside == []
    assert "LEFT THE MACHINE" not in log.read_text()


def test_text_file_as_the_video_gets_infer_py_one_line_error_on_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    url, _, _ = server
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n")
    browser.get(url)
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#face input[type=file]")).send_keys(str(text))
    browser.find_element(By.CSS_SELECTOR, "#speech input[type=file]").send_keys(str(ROOT / "assets" / "demo.wav"))
    wait(browser, lambda d: "notes.txt" in d.find_element(By.ID, "face").text.replace("\n", "")
         and d.find_elements(By.CSS_SELECTOR, "#speech audio"))
    browser.find_element(By.ID, "run").click()
    line = wait(browser, lambda d: status_line(d).startswith("error: ") and status_line(d), RUN_TIMEOUT)

    stderr = io.StringIO()  # infer.py's words for the same file, where the page's copy of it is another path
    with redirect_stderr(stderr):
        assert infer.main(["--video", str(text), "--audio", str(ROOT / "assets" / "demo.wav"),
                           "--out", str(tmp_path / "out.mp4")]) == 1
    expected = stderr.getvalue().strip()
    page_path = re.search(r"error: (\S*notes\.txt)", line).group(1)
    assert line == expected.replace(str(text), page_path)
    assert "\n" not in line and "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(tmp_path / "error.png"))


def test_page_fields_become_infer_py_options_and_page_only_checks_read_as_one_line(tmp_path):
    argv = app.command_line("face.PNG", "speech.wav", tmp_path / "o.mp4", "", " ", "", "", 4, 30, "1,2,3,4")
    assert argv == ["--image=face.PNG", "--audio=speech.wav", f"--out={tmp_path / 'o.mp4'}", "--bbox-shift=4",
                    "--fps=30", "--bbox=1,2,3,4"]
    assert infer.parse_args(argv).image == "face.PNG"
    assert app.command_line("talk.mov", "speech.wav", "o.mp4", fps=30)[0] == "--video=talk.mov"  # fps: photos only
    results = tmp_path / "results"
    results.mkdir()
    sf.write(tmp_path / "speech.wav", np.zeros(16000, np.float32), 16000)
    out, line = app.dub(results, None, str(tmp_path / "speech.wav"))
    assert out is None and line == "error: give a face: a video or a photo"
    out, line = app.dub(results, "-talk.mp4", str(tmp_path / "speech.wav"), "", "", "", "", 0, 25, "")
    assert out is None and line == "error: video not found: -talk.mp4"  # a leading dash is a file, not a flag
    assert list(results.iterdir()) == []  # a run that stopped leaves no folder behind


def test_two_requests_at_once_are_queued_each_into_its_own_folder(server, browser, tmp_path):
    """Two tabs press Dub together: the second, shorter job still finishes last (it waited), each mp4 has its own
    speech's length, in its own folder."""
    from selenium.webdriver.common.by import By
    url, results, _ = server
    wave, sr = sf.read(ROOT / "assets" / "demo.wav", dtype="float32")
    jobs = {"long": 2.0, "short": 0.8}  # seconds of speech: 50 and 20 frames
    tabs = {}
    for name, seconds in jobs.items():
        sf.write(tmp_path / f"{name}.wav", wave[: int(seconds * sr)], sr)
        if tabs:
            browser.switch_to.new_window("tab")
        browser.get(url)
        load_example(browser, tmp_path / f"{name}.wav")
        tabs[name] = browser.current_window_handle
    for name in jobs:
        browser.switch_to.window(tabs[name])
        browser.find_element(By.ID, "run").click()
    for name in jobs:
        browser.switch_to.window(tabs[name])
        wait(browser, lambda d: status_line(d).startswith("done in "), RUN_TIMEOUT)
    browser.close()
    browser.switch_to.window(tabs["long"])
    outs = {name: next(Path(results).glob(f"*/demo_{name}.mp4")) for name in jobs}
    assert outs["long"].parent != outs["short"].parent
    assert outs["long"].stat().st_mtime < outs["short"].stat().st_mtime
    for name, seconds in jobs.items():
        assert abs(video_info(outs[name]).duration - seconds) < 0.05


def test_photo_is_dubbed_at_the_page_fps_into_a_new_folder(tmp_path):
    from PIL import Image
    from lipsync.video import iter_frames
    Image.fromarray(next(iter_frames(ROOT / "assets" / "demo.mp4"))).save(tmp_path / "face.png")
    with np.load(ROOT / "assets" / "demo.track.npz") as track:
        landmarks = track["landmarks"][0]
    box = ",".join(f"{v:.0f}" for v in (*landmarks.min(0), *landmarks.max(0)))
    wave, sr = sf.read(ROOT / "assets" / "demo.wav", dtype="float32")
    sf.write(tmp_path / "speech.wav", wave[: int(0.8 * sr)], sr)
    results = tmp_path / "results"
    results.mkdir()
    stages = []
    out, line = app.dub(results, str(tmp_path / "face.png"), str(tmp_path / "speech.wav"), "", "", "", "", 0, 10, box,
                        stage=stages.append)
    assert line.startswith("done in ") and line.endswith(out) and Path(out).parent.parent == results
    assert stages == ["loading the model", "tracking faces", "generating", "encoding"]
    info = video_info(out)
    assert info.fps == 10 and abs(info.duration - 0.8) < 0.05 and info.has_audio
