"""Which frame's crop is each frame's reference: the second half of the UNet's 8-channel input.

The UNet sees the frame with its lower half masked and a reference crop of the same person. Whatever mouth the
reference shows is in plain view, so the rule decides whether the model can copy its answer instead of reading the
audio:

- "self": every frame is its own reference (MuseTalk's inference). The original mouth of that very frame is in view;
  dubbed with new speech, a model that learned to use it repeats the original video's movement. Official MuseTalk
  weights keep it: it is what they were run with.
- "closed_pose": a frame of the same track whose mouth is closed (among the CLOSED_FRACTION most closed frames),
  at least MIN_GAP frames away where the track allows, and whose jaw pose is nearest. The reference then shows the
  face and its pose but no mouth shape to copy: the opening has to come from the audio. `train.py --reference
  closed_pose` trains with the same kind of reference (lipsync.training.data: drawn from the quarter of those frames
  nearest in pose), and a checkpoint trained so makes it infer.py's default (LipSync.reference).

- "audio": per output frame, a frame of the same track of similar jaw pose whose lips are as far apart as the speech
  asks for then (audio_match, with lipsync.opening's prediction). The reference shows a mouth, but the speech chose
  it, not the video: dubbed with new speech, the original mouth's movement is not what the UNet is shown. The
  reference crop is warped onto its frame's eyes and nose (lipsync.align), so its mouth sits where the frame's goes.
  `train.py --reference audio` trains with such references whose gap is nearest the target's own (the answer the
  audio should give), so the model learns to draw the mouth its reference shows, in its frame's pose.

All take iBUG-68 landmarks in any pixel frame: openings and poses are normalised by the face height (chin 8 to
nose bridge 27).
"""

import numpy as np

RULES = ("self", "closed_pose", "audio")
CHUNK = 64  # frames whose pose distances closed_pose computes at once
MIN_GAP = 5  # a reference is at least this many frames from its frame (training always; closed_pose where it can)
CLOSED_FRACTION = 0.2  # the share of a track's face frames that count as closed-mouthed
MATCH_POOL = 0.25  # "audio": the share of a track's other face frames, nearest in jaw pose, it picks the mouth from
SHUT_RANGE = 0.012  # "audio": a track whose inner-lip gap spans less than this (face heights, 5th to 95th percentile)
# never opens its mouth (the demo video: 0.006; a photo: 0; the talking clips here: 0.017 to 0.19)


def face_height(landmarks):
    """(N, 68, 2) -> (N,) chin (8) to nose bridge (27) distance."""
    return np.linalg.norm(landmarks[:, 8] - landmarks[:, 27], axis=-1)


def mouth_gap(landmarks):
    """(N, 68, 2) -> (N,) inner-lip gap (62 to 66) / face height: 0 when the lips meet."""
    return np.linalg.norm(landmarks[:, 62] - landmarks[:, 66], axis=-1) / face_height(landmarks)


def is_shut(landmarks, face) -> bool:
    """(N, 68, 2), (N,) -> True when the track's mouth never opens: its face frames' gaps span under SHUT_RANGE
    between their 5th and 95th percentiles (one face frame, a photo, always)."""
    gap = mouth_gap(np.asarray(landmarks, np.float64)[np.asarray(face, bool)])
    return bool(len(gap) < 2 or np.quantile(gap, 0.95) - np.quantile(gap, 0.05) < SHUT_RANGE)


def jaw_pose(landmarks):
    """(N, 68, 2) -> (N, 17, 2) the jaw contour (0-16) relative to the nose bridge, in face heights."""
    return (landmarks[:, 0:17] - landmarks[:, 27:28]) / face_height(landmarks)[:, None, None]


def closed_frames(landmarks, face):
    """(N,) bool: face frames whose mouth gap is within the smallest CLOSED_FRACTION of the track's face frames."""
    face = np.asarray(face, bool)
    gap = mouth_gap(landmarks)
    return face & (gap <= np.quantile(gap[face], CLOSED_FRACTION))


def pose_distance(jaw_a, jaw_b):
    """(N, 17, 2), (K, 17, 2) jaw poses -> (N, K) mean jaw-point distance of every pose in a to each in b."""
    return np.linalg.norm(jaw_a[:, None] - jaw_b[None], axis=-1).mean(-1)


def closed_pose(landmarks, face):
    """(N, 68, 2), (N,) -> (N,) for every frame, the closed-mouthed face frame nearest to it in jaw pose among those
    at least MIN_GAP frames away (any closed-mouthed frame when none is that far)."""
    cand = np.flatnonzero(closed_frames(landmarks, face))
    jaw = jaw_pose(landmarks)
    cand_jaw = jaw[cand]  # (K, 17, 2)
    out = np.empty(len(jaw), np.int64)
    for i in range(0, len(jaw), CHUNK):  # (CHUNK, K, 17, 2) at a time: a long video's N x K would not fit in memory
        dist = pose_distance(jaw[i:i + CHUNK], cand_jaw)  # (c, K)
        near = np.abs(np.arange(i, i + len(dist))[:, None] - cand[None]) < MIN_GAP
        dist = np.where(near & ~near.all(1, keepdims=True), np.inf, dist)
        out[i:i + len(dist)] = cand[dist.argmin(1)]
    return out


def pose_pool(jaw, i, cand, share):
    """Jaw poses (N, 17, 2), a frame i, candidate frames (K,) -> the max(1, int(K share)) candidates nearest frame i
    in jaw pose (ties by index)."""
    dist = pose_distance(jaw[i:i + 1], jaw[cand])[0]  # (K,)
    return cand[np.argsort(dist, kind="stable")[:max(1, int(len(cand) * share))]]


def audio_match(landmarks, face, predicted, frames=None):
    """The "audio" rule: (N, 68, 2), (N,) the track; predicted (n,) how open the speech asks the mouth to be at each
    output frame (lipsync.opening: only their order counts); frames (n,) the source frame each output frame shows
    (default 0 .. n-1) -> (n,) each output frame's reference frame.

    Each prediction's rank among the n becomes the gap at that quantile of the track's own face frames (the
    speaker's own range: the quietest moments get its most closed mouths); -inf predictions (pauses) all share rank
    0, the most closed, and the others spread over the whole range. The reference is, among the MATCH_POOL share of
    face frames nearest in jaw pose to the shown frame and at least MIN_GAP frames from it (any face frame when none
    is that far), the one whose gap is nearest that target. Output frames showing no face keep their own
    frame (nothing is generated there)."""
    landmarks, face = np.asarray(landmarks, np.float64), np.asarray(face, bool)
    predicted = np.asarray(predicted, np.float64)
    frames = np.arange(len(predicted)) if frames is None else np.asarray(frames)
    good = np.flatnonzero(face)
    gap, jaw = mouth_gap(landmarks), jaw_pose(landmarks)
    speech = np.isfinite(predicted)  # -inf: a pause (LipSync.openings), shown the most closed mouth (rank 0)
    rank = np.zeros(len(predicted))
    rank[speech] = np.argsort(np.argsort(predicted[speech], kind="stable"), kind="stable") / max(1, speech.sum() - 1)
    target = np.quantile(gap[good], rank)  # (n,)
    out = frames.copy()
    pools = {}
    for k, i in enumerate(frames):
        if not face[i]:
            continue
        if i not in pools:
            far = good[np.abs(good - i) >= MIN_GAP]
            pools[i] = pose_pool(jaw, i, far if len(far) else good, MATCH_POOL)
        pool = pools[i]
        out[k] = pool[np.abs(gap[pool] - target[k]).argmin()]
    return out


def pick(rule, landmarks, face):
    """The reference frame of every frame of a track -> (N,) int64 indices, each naming a frame with a face."""
    face = np.asarray(face, bool)
    if rule not in RULES:
        raise ValueError(f"reference rule must be one of {', '.join(RULES)}, not {rule!r}")
    if rule == "self" or face.sum() < 2:  # one face frame (a still photo): nothing else to show
        return np.arange(len(face))
    if rule == "audio":
        raise ValueError("the audio rule picks per output frame from the speech: references.audio_match")
    return closed_pose(np.asarray(landmarks, np.float64), face)
