"""A local web page that runs infer.py: a face video or photo + speech -> the dubbed mp4, played on the page.

    pip install -r requirements-app.txt
    python -m lipsync.app [--port 7860] [--results results/app]      # then open http://127.0.0.1:7860

Gradio (https://www.gradio.app), the usual front end of lip-sync demos, run offline: no telemetry, its bundled
fonts, nothing fetched from elsewhere (tests/test_app.py checks every request the page makes). The page is only a
form for infer.py: each run builds infer.py's command line from it and calls `infer.run`, so the checks, the one-line
error messages, the models and the output are the command line's. Each run writes to a new folder under --results;
runs are queued and go one at a time. Run it from the repository root, like infer.py (it imports infer).
"""

import argparse
import filecmp
import os
import tempfile
import time
import traceback
from pathlib import Path

import infer
from lipsync.checks import IMAGE_SUFFIXES

EXAMPLE = (infer.DEMO["video"], infer.DEMO["audio"])
INTRO = """# lipsync
Give a face (a video, or a photo) and speech; the lower face is regenerated so the lips follow the speech
([MuseTalk](https://github.com/TMElyralab/MuseTalk)'s method). The result keeps the input's size and frame rate and
has the speech's length."""


def bundled(path):
    """An example file arrives as Gradio's copy; use the bundled original, so the track file beside it is found."""
    for example in EXAMPLE:
        if Path(path).name == Path(example).name and filecmp.cmp(path, example, shallow=False):
            return example
    return path


def command_line(face, audio, out, ckpt="", unet="", vae="", whisper="", bbox_shift=0.0, fps=None, bbox=""):
    """infer.py's arguments for the page's fields (empty fields are left to infer.py's defaults). The face is a photo
    when its name says so (lipsync.checks.IMAGE_SUFFIXES), else a video: infer.py then judges any file."""
    if not face:
        raise infer.InputError("give a face: a video or a photo")
    if not audio:
        raise infer.InputError("give the speech: a file or a recording")
    photo = Path(face).suffix.lower() in IMAGE_SUFFIXES
    argv = [f"--image={face}" if photo else f"--video={bundled(face)}", f"--audio={bundled(audio)}", f"--out={out}",
            f"--bbox-shift={bbox_shift or 0:g}"]
    if photo and fps:
        argv.append(f"--fps={fps:g}")
    for flag, value in (("--ckpt", ckpt), ("--unet", unet), ("--vae", vae), ("--whisper", whisper), ("--bbox", bbox)):
        if value and value.strip():
            argv.append(f"{flag}={value.strip()}")
    return argv


def dub(results, face, audio, *options, stage=lambda name: None):
    """One run: (the mp4 written, the status line); errors come back as infer.py's one line, never a traceback."""
    start = time.perf_counter()
    out_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=results))
    out = out_dir / f"{Path(face or 'face').stem}_{Path(audio or 'speech').stem}.mp4"
    try:
        infer.run(infer.parse_args(command_line(face, audio, out, *options)), stage)
    except Exception as err:
        if not isinstance(err, infer.ERRORS):  # a bug: the traceback goes to the server's log, the page gets one line
            traceback.print_exc()
            err = f"{type(err).__name__}: {err}"
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        return None, infer.error_line(err)
    return str(out), f"done in {time.perf_counter() - start:.0f} s: {out}"


def build(results):
    """The page (a gr.Blocks)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import gradio as gr

    def run(face, audio, ckpt, unet, vae, whisper, bbox_shift, fps, bbox, progress=gr.Progress(track_tqdm=True)):
        # infer.py's tqdm bars (track faces, prepare, lip-sync) show between the stages, frame by frame
        return dub(results, face, audio, ckpt, unet, vae, whisper, bbox_shift, fps, bbox,
                   stage=lambda name: progress(0, desc=name))

    with gr.Blocks(title="lipsync", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                face = gr.File(label="Face: a video or a photo", elem_id="face")
                audio = gr.Audio(label="Speech: a file, or record it", type="filepath",
                                 sources=["upload", "microphone"], elem_id="speech")
                with gr.Accordion("Model", open=False):
                    ckpt = gr.Textbox(label="Checkpoint: a lipsync.pt from train.py (empty: the bundled one)",
                                      placeholder=infer.DEMO["ckpt"])
                    gr.Markdown("Or the official MuseTalk weights, all three instead of a checkpoint:")
                    unet = gr.Textbox(label="MuseTalk UNet", placeholder="models/musetalkV15/unet.pth")
                    vae = gr.Textbox(label="VAE folder", placeholder="models/sd-vae")
                    whisper = gr.Textbox(label="Whisper folder", placeholder="models/whisper")
                with gr.Accordion("Options", open=False):
                    bbox_shift = gr.Number(0, label="Bbox shift, px (+ = down: the mouth opens more; - = up)")
                    fps = gr.Number(25, label="Frames per second, for a photo")
                    bbox = gr.Textbox(label="Fixed face box x1,y1,x2,y2 in every frame (instead of face tracking)")
                button = gr.Button("Dub", variant="primary", elem_id="run")
                gr.Examples([list(EXAMPLE)], [face, audio], label="Example: the bundled demo", elem_id="example")
            with gr.Column():
                result = gr.Video(label="Result", interactive=False, buttons=["download"], height=520,
                                  elem_id="result")
                status = gr.Textbox(label="Status", interactive=False, lines=1, max_lines=4, elem_id="status")
        button.click(run, [face, audio, ckpt, unet, vae, whisper, bbox_shift, fps, bbox], [result, status],
                     concurrency_limit=1)
    return page


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every network interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--results", default="results/app", help="each run's output goes to a new folder in it")
    args = p.parse_args(argv)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    page = build(args.results)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=args.host, server_port=args.port, ssr_mode=False, allowed_paths=[args.results],
                inbrowser=False)


if __name__ == "__main__":
    main()
