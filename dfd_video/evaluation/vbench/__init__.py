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

# The paper's quality average (its Tables 1, 3, 4) and the extra dimensions it reports outside it.
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


def averages(summary: dict[str, float]) -> dict[str, float]:
    """The paper's quality average over the dimensions of PAPER_AVERAGE present in `summary` ("vbench_average"),
    and, when dynamic degree is present, the average over those and dynamic degree ("vbench_average_dynamic").
    Imaging quality is in neither (the paper leaves it out). Empty when no averaged dimension is present."""
    used = [k for k in PAPER_AVERAGE if k in summary]
    if not used:
        return {}
    out = {"vbench_average": sum(summary[k] for k in used) / len(used)}
    if "dynamic_degree" in summary:
        out["vbench_average_dynamic"] = (sum(summary[k] for k in used) + summary["dynamic_degree"]) / (len(used) + 1)
    return out


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
