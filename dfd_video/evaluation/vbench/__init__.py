"""VBench's quality dimensions (Huang et al., CVPR 2024; VBench-I2V), reimplemented from the published source at
github.com/Vchitect/VBench, one file per dimension, each naming the VBench file it follows, the frames it samples,
the model it uses and its preprocessing:

  subject_consistency.py     DINO ViT-B/16 CLS features, cosine to the previous and the first frame
  background_consistency.py  CLIP ViT-B/32 image embeddings, the same formula
  temporal_flickering.py     model-free: (255 - mean absolute difference of consecutive frames) / 255
  aesthetic_quality.py       LAION aesthetic linear head on CLIP ViT-L/14 image embeddings, / 10
  i2v_subject.py             DINO ViT-B/16, frames against the conditioning image and their neighbours
  i2v_background.py          DreamSim (dreamsim.py, written here), the same formula as I2V subject
  dynamic_degree.py          RAFT optical flow (raft.py, written here), VBench's moving-or-not rule
  imaging_quality.py         MUSIQ (musiq.py, written here) with pyiqa's SPAQ weights, / 100
  motion_smoothness.py       AMT-S frame interpolation (amt.py, written here) against the odd frames

Why not the `vbench` package itself: vbench 0.1.5 requires transformers==4.33.2 and numpy<2 (and torchvision, decord,
openai-clip, pyiqa), which this project's pins exclude.

Every dimension object has `name`, `key` (its per-video cache entry), `folder` (the model, or None), `needs_image`
and `__call__(frames uint8 [T, H, W, 3], image uint8 [H, W, 3] | None, fps) -> float` (the per-video score; see
common.Dimension); a dimension's value for a method is the mean of its per-video scores."""
from __future__ import annotations

# The paper's "Average" / "Average VBench" (Tables 1, 3, 4): the plain mean of the dimensions it reports beside it
# (Table 1, text-to-video: the first five; Tables 3 and 4, image-to-video: all seven). Not VBench's Quality Score.
PAPER_AVERAGE = ("subject_consistency", "background_consistency", "aesthetic_quality", "temporal_flickering",
                 "motion_smoothness", "i2v_subject", "i2v_background")
ORDER = PAPER_AVERAGE + ("dynamic_degree", "imaging_quality")
FOLLOWS = {"subject_consistency": "vbench/subject_consistency.py",
           "background_consistency": "vbench/background_consistency.py",
           "temporal_flickering": "vbench/temporal_flickering.py",
           "aesthetic_quality": "vbench/aesthetic_quality.py",
           "i2v_subject": "vbench2_beta_i2v/i2v_subject.py",
           "i2v_background": "vbench2_beta_i2v/i2v_background.py",
           "dynamic_degree": "vbench/dynamic_degree.py",
           "imaging_quality": "vbench/imaging_quality.py",
           "motion_smoothness": "vbench/motion_smoothness.py"}

# VBench's own Quality Score (scripts/constant.py and cal_final_score.py, github.com/Vchitect/VBench at 45e79ec):
# each dimension's score x as (x - Min) / (Max - Min) (NORMALIZE_DIC), times its weight (DIM_WEIGHT), summed and
# divided by the weights' sum, over QUALITY_LIST. VBench-I2V's (cal_i2v_final_score.py: NORMALIZE_DIC_I2V,
# DIM_WEIGHT_I2V, I2V_QUALITY_LIST) has the same bounds and weights without temporal flickering.
QUALITY_BOUNDS = {"subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
                  "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
                  "dynamic_degree": (0.0, 1.0), "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0)}
QUALITY_WEIGHTS = {k: 0.5 if k == "dynamic_degree" else 1.0 for k in QUALITY_BOUNDS}
QUALITY = tuple(QUALITY_BOUNDS)
I2V_QUALITY = tuple(k for k in QUALITY if k != "temporal_flickering")


def paper_mean(summary: dict[str, float]) -> float | None:
    """The paper's plain mean over the dimensions of PAPER_AVERAGE present in `summary` (None when none is)."""
    used = [k for k in PAPER_AVERAGE if k in summary]
    return sum(summary[k] for k in used) / len(used) if used else None


def quality_score(summary: dict[str, float], i2v: bool = False) -> float | None:
    """VBench's Quality Score (VBench-I2V's with i2v) over the quality dimensions present in `summary`: with all of
    them, VBench's number; with some missing, the same normalised weighted mean over those present (VBench's script
    would count a missing one as a score of 0). None when none is present."""
    used = [k for k in (I2V_QUALITY if i2v else QUALITY) if k in summary]
    if not used:
        return None
    normalised = {k: (summary[k] - QUALITY_BOUNDS[k][0]) / (QUALITY_BOUNDS[k][1] - QUALITY_BOUNDS[k][0]) for k in used}
    return sum(QUALITY_WEIGHTS[k] * normalised[k] for k in used) / sum(QUALITY_WEIGHTS[k] for k in used)


def averages(summary: dict[str, float], i2v: bool = False) -> dict[str, float]:
    """The report's two averages, each where it has a dimension: "paper_average" (paper_mean) and
    "vbench_quality_score" (quality_score)."""
    out = {"paper_average": paper_mean(summary), "vbench_quality_score": quality_score(summary, i2v)}
    return {k: v for k, v in out.items() if v is not None}


def build(device, dino: str | None = None, clip_b32: str | None = None, aesthetic_clip: str | None = None,
          aesthetic_head: str | None = None, flickering: bool = False, i2v: bool = False,
          raft: str | None = None, musiq: str | None = None, amt: str | None = None,
          dreamsim: str | None = None) -> list:
    """The dimension objects the given models allow, in ORDER; a dimension whose model is not given is left out.
    i2v adds the image-to-video dimensions (I2V subject with `dino`, I2V background with `dreamsim`, a DreamSim
    cache folder); raft (a raft-things.pth) adds dynamic degree, musiq (pyiqa's musiq_spaq_ckpt) imaging quality,
    amt (amt-s.pth) motion smoothness. ValueError naming the flag on a bad model."""
    from dfd_video.evaluation.vbench import (aesthetic_quality, amt as amt_model, background_consistency, common,
                                  dreamsim as dreamsim_model, dynamic_degree, i2v_background, i2v_subject,
                                  imaging_quality, motion_smoothness,
                                  musiq as musiq_model, raft as raft_model, subject_consistency, temporal_flickering)
    dims = []
    dino_model = None if dino is None else subject_consistency.load_dino(dino, device, "--vbench-dino")
    if dino_model is not None:
        dims.append(subject_consistency.SubjectConsistency(dino_model, dino))
    if clip_b32 is not None:
        dims.append(background_consistency.BackgroundConsistency(
            common.load_clip(clip_b32, device, "--vbench-clip"), clip_b32))
    if aesthetic_head is not None:
        dims.append(aesthetic_quality.AestheticQuality(
            common.load_clip(aesthetic_clip, device, "--aesthetic-clip"), aesthetic_clip,
            aesthetic_head))
    if flickering:
        dims.append(temporal_flickering.TemporalFlickering())
    if i2v and dino_model is not None:
        dims.append(i2v_subject.I2VSubject(dino_model, dino))
    if i2v and dreamsim is not None:
        dims.append(i2v_background.I2VBackground(
            dreamsim_model.load_dreamsim(dreamsim, device, "--vbench-dreamsim"), dreamsim))
    if amt is not None:
        dims.append(motion_smoothness.MotionSmoothness(amt_model.load_amt(amt, device, "--amt"), amt))
    if raft is not None:
        dims.append(dynamic_degree.DynamicDegree(raft_model.load_raft(raft, device, "--raft"), raft))
    if musiq is not None:
        dims.append(imaging_quality.ImagingQuality(musiq_model.load_musiq(musiq, device, "--musiq"), musiq))
    return sorted(dims, key=lambda d: ORDER.index(d.name))
