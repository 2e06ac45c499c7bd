"""Inference: frames + face track -> Avatar (everything that does not depend on the audio) -> generated frames.

An `Avatar` holds what MuseTalk's realtime mode caches (docs/musetalk.md §6): the source frames, their face track,
the UNet's image input per frame -- latents of [masked crop, reference crop], the reference picked by the model's
rule (lipsync.references: the frame itself as in MuseTalk's inference, or a closed-mouthed frame of similar pose;
under the "audio" rule every frame keeps its own crop and the speech picks the reference per output frame, in
avatar_frames, whose crop is then warped onto the frame's eyes and nose and encoded) unless
`prepare_avatar(reference=...)` names another rule or other frames -- the blend masks (lipsync.blend), and for faces
pasted over 1.25x the crop a bank of the video's own fine mouth detail (lipsync.texture). Output
frame i shows source frame `avatar.source_index(i)`: the video plays forward then backward (ping-pong, 2N cycle), so
audio longer than the video loops without a jump. Per frame the loop then runs only audio windows ->
LipSync.forward (PE, UNet, VAE decode) -> the texture the bank lends for each face -> paste.

    track = track_frames(frames, tracker)                 # lipsync.track: or read_track(...), a BoxTracker for --bbox
    avatar = prepare_avatar(frames, fps, track, model)    # lipsync.avatar: save_avatar(avatar, DIR) / load_avatar(DIR)
    for frame in avatar_frames(model, avatar, model.audio_windows(wave, n, fps)): ...
    # the "audio" rule also takes openings=model.openings(wave, n, fps)
    for frame in stream_frames(model, avatar, audio_chunks): ...  # MelEncoder checkpoints: frames as audio arrives

Avatars on disk: lipsync.avatar. Face tracks: lipsync.track.
"""

import numpy as np
import torch

from . import references
from .align import reference_maps, warp
from .avatar import Avatar, vae_fingerprint
from .blend import make_blend, paste
from .mel_encoder import MelEncoder
from .restore import MIN_UPSCALE
from .texture import texture_bank
from .streaming import WindowStream
from .track import Track
from .tracking import crop_faces, to_crop_coords
from .vae import to_model_images, to_pixels, to_uint8_images, to_uint8_pixels

# ----------------------------------------------------------------------------- avatar


def with_references(latents: torch.Tensor, reference) -> torch.Tensor:
    """UNet image inputs (N, 8, s, s) = [masked crop, reference crop] -> the same with frame i's reference half taken
    from frame reference[i] (reference: (N,) frame indices)."""
    idx = torch.as_tensor(np.asarray(reference), dtype=torch.long, device=latents.device)
    return torch.cat([latents[:, :4], latents[idx, 4:]], 1)


@torch.inference_mode()
def prepare_avatar(frames, fps, track: Track, model, batch_size=16, source="", bar=None, reference=None,
                   texture=True) -> Avatar:
    """Crops -> VAE latents of [masked, reference] (batched) and blend masks for every frame with a face.

    reference: a rule of lipsync.references ("self", "closed_pose", "audio"), or (N,) frame indices: frame i's
    reference crop is frame reference[i]'s (one with a face wherever frame i has one); default None = the model's own
    rule (model.reference). With "audio" the latents keep every frame's own crop as its reference half, and
    avatar_frames swaps in the frame the speech picks (references.audio_match). texture: also build the mouth
    texture bank (lipsync.texture; None for faces pasted at most 1.25x the crop)."""
    frames = np.asarray(frames)
    if len(frames) != len(track):
        raise ValueError(f"{len(frames)} frames but a track of {len(track)}")
    if not track.face.any():
        raise ValueError("no face found in any frame")
    size = model.crop_size
    good = np.flatnonzero(track.face)
    parts = []
    for k in range(0, len(good), batch_size):
        idx = good[k: k + batch_size]
        crops = crop_faces(frames[idx], track.boxes[idx], size, lanczos=model.geometry == "musetalk")
        parts.append(model.face.unet_input(crops))  # (b, S, S, 3) -> (b, 8, s, s), latents x scaling_factor
        if bar is not None:
            bar.update(len(idx))
    encoded = torch.cat(parts)
    latents = encoded.new_zeros((len(frames),) + encoded.shape[1:])
    latents[torch.from_numpy(good).to(latents.device)] = encoded
    if reference is None or isinstance(reference, str):
        rule = reference or model.reference
        if rule == "audio":  # chosen per output frame from the speech (render); the avatar keeps every frame's own
            model.require_opening()
        reference = references.pick("self" if rule == "audio" else rule, track.landmarks, track.face)
    else:
        rule = "custom"
    reference = np.asarray(reference)
    if reference.shape != (len(frames),) or not track.face[reference[good]].all():
        raise ValueError(f"reference must name, for each of the {len(frames)} frames, a frame with a face")
    if rule not in ("self", "audio"):
        latents = with_references(latents, reference)
    shape = frames.shape[1:3]
    blends = [make_blend(track.landmarks[i], track.boxes[i], shape) if track.face[i] else None
              for i in range(len(frames))]
    bank = texture_bank(frames, track, size) if texture else None
    return Avatar(frames, float(fps), track, latents, blends, size, vae_fingerprint(model), str(source),
                  model.geometry, rule, bank)


# ----------------------------------------------------------------------------- generation


def shut_guidance(model, avatar: Avatar) -> float | None:
    """The audio guidance for an avatar: under the "audio" rule on a track whose mouth never opens
    (references.is_shut: a photo, a closed-mouthed video), the opening head's shut_guidance, since every reference
    the rule can show is closed; otherwise None (the model's own guidance)."""
    if avatar.reference != "audio" or model.opening is None:
        return None
    return model.opening.cfg.shut_guidance if references.is_shut(avatar.track.landmarks, avatar.track.face) else None


def audio_references(avatar: Avatar, openings, start: int = 0) -> np.ndarray:
    """The "audio" rule for output frames start .. start + n - 1: their predicted openings (n,) (model.openings) ->
    (n,) each one's reference frame (references.audio_match on the avatar's track)."""
    shown = avatar.source_index(np.arange(start, start + len(openings)))
    return references.audio_match(avatar.track.landmarks, avatar.track.face, openings, shown)


@torch.inference_mode()
def aligned_references(model, avatar: Avatar, refs, frames) -> torch.Tensor:
    """The "audio" rule's reference half for frames (b,) showing refs (b,): each reference frame's crop warped onto
    its frame's eyes and nose (lipsync.align), then VAE-encoded -> (b, 4, s, s) scaled latents."""
    t, size = avatar.track, avatar.crop_size
    crops = crop_faces(avatar.frames[refs], t.boxes[refs], size, lanczos=avatar.geometry == "musetalk")
    maps = reference_maps(to_crop_coords(t.landmarks[refs], t.boxes[refs], size),
                          to_crop_coords(t.landmarks[frames], t.boxes[frames], size))
    p = avatar.latents
    return model.face.encode(warp(to_model_images(crops), maps, size).to(p.device, p.dtype))


@torch.inference_mode()
def render(model, avatar: Avatar, windows: torch.Tensor, first: int, colour: bool, detail: bool, pad_to: int = 0,
           refs=None, texture: bool = True, guidance: float | None = None):
    """Audio windows (b, T, D) for output frames first .. first + b - 1 -> those frames, in order. With pad_to, the
    model always sees pad_to frames (the last face frame repeated, extra outputs dropped): static shapes for compiled
    models and CUDA graphs. refs (b,): each frame's reference frame, replacing the avatar's (the "audio" rule).
    texture: add the avatar's mouth texture (lipsync.texture) when it has one. guidance: the audio guidance (None:
    the model's own, LipSync.generate), applied around each frame's own lips."""
    src = avatar.source_index(np.arange(first, first + len(windows)))
    has = avatar.track.face[src]
    crops = iter(())
    if has.any():
        sel = np.flatnonzero(has)
        if len(sel) < pad_to:
            sel = np.concatenate([sel, np.full(pad_to - len(sel), sel[-1])])
        dev = avatar.latents.device
        unet_in = avatar.latents[torch.from_numpy(src[sel]).to(dev)]  # (b', 8, s, s)
        if refs is not None:
            unet_in = torch.cat([unet_in[:, :4], aligned_references(model, avatar, refs[sel], src[sel])], 1)
        t = avatar.track
        lips = to_crop_coords(t.landmarks[src[sel], 48:68], t.boxes[src[sel]], avatar.crop_size)  # (b', 20, 2)
        faces = model.generate(unet_in, windows[torch.from_numpy(sel)], guidance, lips)  # (b', 3, S, S)
        pixels = to_pixels(faces)  # (b', 3, S, S) float in [0, 255]
        crops = iter(to_uint8_pixels(pixels))  # (b', S, S, 3)
        fines = iter(restored(model, faces, [avatar.blends[i] for i in src[sel]]))
        textures = iter(avatar.texture.detail(pixels, src[sel], t.boxes[src[sel]])
                        if avatar.texture is not None and texture else [None] * len(sel))  # (top, left, detail) each
    for j, i in enumerate(src):
        yield (paste(avatar.frames[i], next(crops), avatar.blends[i], colour, detail, next(fines), next(textures))
               if has[j]
               else np.array(avatar.frames[i]))


@torch.inference_mode()
def restored(model, faces: torch.Tensor, blends) -> list:
    """Generated faces (b, 3, S, S) -> for each, its restored face (2S, 2S, 3) uint8 when the model has a restorer
    and the paste scales the face up more than MIN_UPSCALE times, else None (little detail to add: the demo's
    129 px faces from 128 px crops are pasted as generated)."""
    out, r = [None] * len(faces), model.restorer
    big = [k for k, b in enumerate(blends) if b.box[2] > MIN_UPSCALE * faces.shape[-1]] if r is not None else []
    if big:
        for k, f in zip(big, to_uint8_images(r(faces[big].to(next(r.parameters()).dtype)))):  # (2S, 2S, 3) each
            out[k] = f
    return out


def avatar_frames(model, avatar: Avatar, windows, batch_size=8, start=0, colour=True, static=False, detail=True,
                  openings=None, texture=True):
    """Audio windows -> full frames (H, W, 3) uint8, yielded in order as each batch is made.

    windows: (n, T, D) (model.audio_windows) for n output frames, or an iterable of such blocks arriving over time
    (stream_windows); blocks are re-batched to batch_size (the last batch may be smaller). Output frame i (counting
    from `start`) shows avatar.source_index(i); frames without a face pass through unchanged.
    static: every UNet/decoder call gets exactly batch_size frames (tails and no-face gaps padded), so a compiled
    model never re-compiles; the frames are the same. colour, detail: blend.paste's colour matching and the
    source's fine detail outside the mouth. texture: the avatar's mouth texture borrowed from its own frames
    (lipsync.texture; avatars of faces pasted at most 1.25x the crop have none). openings: (n,) the whole speech's predicted lip gaps
    (model.openings(wave, n, fps)), which an avatar prepared with the "audio" rule needs.
    """
    refs = None
    if avatar.reference == "audio":
        if not isinstance(windows, torch.Tensor):
            raise ValueError("the audio reference rule ranks the whole speech's openings, so it cannot stream; "
                             "prepare the avatar with reference self or closed_pose")
        if openings is None or len(openings) != len(windows):
            raise ValueError("an avatar with the audio reference rule needs the speech's openings for every frame "
                             "(model.openings)")
        refs = audio_references(avatar, openings, start)  # (n,)
    guidance = shut_guidance(model, avatar)
    blocks = [windows] if isinstance(windows, torch.Tensor) else windows
    pending, done, pad_to = None, start, batch_size if static else 0

    def part(k):
        return None if refs is None else refs[done - start: done - start + k]

    for block in blocks:
        pending = block if pending is None else torch.cat([pending, block.to(pending.device)])
        while len(pending) >= batch_size:
            yield from render(model, avatar, pending[:batch_size], done, colour, detail, pad_to, part(batch_size),
                              texture, guidance)
            pending, done = pending[batch_size:], done + batch_size
    if pending is not None and len(pending):
        yield from render(model, avatar, pending, done, colour, detail, pad_to, part(len(pending)), texture,
                          guidance)


def stream_windows(model, chunks, fps):
    """16 kHz mono audio chunks (any sizes) -> window blocks (k, T, D) as soon as each frame's audio is in.

    Only MelEncoder checkpoints stream (a whisper encoder needs the whole file); concatenated, the blocks equal
    model.audio_windows(whole_wave, floor(seconds * fps), fps).
    """
    if not isinstance(model.audio, MelEncoder):
        raise ValueError("streaming audio needs a checkpoint with our MelEncoder; whisper features are whole-file")
    stream = WindowStream(model.audio, fps, model.left, model.right)
    for chunk in chunks:
        windows = stream.push(chunk)
        if len(windows):
            yield windows
    windows = stream.finish()
    if len(windows):
        yield windows


def stream_frames(model, avatar: Avatar, chunks, batch_size=8, colour=True, static=False, detail=True):
    """Realtime: audio chunks in, frames out (each batch as soon as its audio has arrived)."""
    return avatar_frames(model, avatar, stream_windows(model, chunks, avatar.fps), batch_size, colour=colour,
                         static=static, detail=detail)
