"""From thresholded region channels to what is exported and scored: one label map.

The sigmoid channels are thresholded separately, so a predicted ET may lie outside TC and TC
outside WT. The exported file is the label map (WT -> 2, TC -> 1, ET -> 4, the more specific
region winning), and BraTS scores that file, so evaluation must score the regions of the label map,
not the raw channels: `label_map_regions` builds the map, postprocesses it in label space and
returns its regions, nested ET within TC within WT; `predicted_regions` thresholds probabilities
and does all that, for scoring.score_probabilities (validation and evaluation) and predict.py;
export.export_case writes `to_label_map` of them, which is that same map.
A binary task (one channel) is a 0/1 map.
The label-space operations, each driven by eval.* keys (0 / false: off): keep_largest_tumour,
remove_small_tumours, remove_unsure_tumours (it removes a small component only when the network was
unsure of it), remove_minor_tumours (a component holding a small share of the largest one's probability
mass; these two read the probabilities), relabel_small_enhancing; postselect.py
chooses among them on the validation cases.
"""
import numpy as np
from scipy import ndimage

from transforms.regions import labels_to_regions, regions_to_labels, task_regions

NECROSIS, ENHANCING = 1, 4   # labels of the project's label maps (REGIONS); export may write ET as 3


def to_label_map(pred_regions, task, enhancing_label=ENHANCING):
    """Boolean (R, *spatial) region channels -> uint8 label map (*spatial): for brats WT -> 2,
    TC -> 1, ET -> enhancing_label in that order (ET wins, as regions_to_labels does); binary -> 0/1."""
    regions = np.asarray(pred_regions, bool)
    expected = len(task_regions(task))
    if regions.ndim < 2 or len(regions) != expected:
        raise ValueError(f"data.task {task!r}: prediction of shape {regions.shape} should have "
                         f"{expected} region channels first")
    if task == "binary":
        return regions[0].astype(np.uint8)
    return regions_to_labels(regions, enhancing_label).numpy().astype(np.uint8)


def relabel_small_enhancing(labels, min_voxels, enhancing_label=ENHANCING):
    """nnU-Net's BraTS rule in label space: an enhancing tumour smaller than `min_voxels` voxels
    becomes necrosis (so it stays in TC and WT); returns a new map."""
    labels = np.array(labels)
    enhancing = labels == enhancing_label
    if min_voxels > 0 and 0 < np.count_nonzero(enhancing) < min_voxels:
        labels[enhancing] = NECROSIS
    return labels


def keep_largest_tumour(labels):
    """Only the largest face-connected component of the whole tumour (labels > 0), with its labels
    (mateuszbuda's LGG rule, applied to every region at once); a new map."""
    components, count = ndimage.label(np.asarray(labels) > 0)
    if count <= 1:
        return np.array(labels)
    largest = 1 + int(np.bincount(components.ravel())[1:].argmax())
    return np.where(components == largest, labels, 0).astype(np.asarray(labels).dtype)


def remove_small_tumours(labels, min_voxels):
    """Every face-connected component of the whole tumour (labels > 0) smaller than `min_voxels`
    voxels is cleared with all its labels (nnU-Net's small-component removal, the cure for a stray
    false positive far from the tumour); 0 keeps every component. Returns a new map."""
    labels = np.array(labels)
    if min_voxels <= 0:
        return labels
    components, count = ndimage.label(labels > 0)
    if count == 0:
        return labels
    small = np.flatnonzero(np.bincount(components.ravel()) < min_voxels)
    labels[np.isin(components, small[small > 0])] = 0
    return labels


def tumour_probability(probs):
    """(*spatial) probability that each voxel is tumour: the largest of its region probabilities
    (R, *spatial; numpy, or a tensor on any device), since a voxel is tumour in the label map when
    any region passes the threshold."""
    if hasattr(probs, "detach"):
        return probs.detach().amax(0).float().cpu().numpy()
    return np.asarray(probs, np.float32).max(0)


def tumour_components(labels, probs, key):
    """(tumour probability, 26-connected tumour components, their count) of a label map and its region
    probabilities, for the rules that judge components by probability; `key` names the rule in errors."""
    if probs is None:
        raise ValueError(f"{key} needs the region probabilities: pass probs")
    tumour = tumour_probability(probs)
    if tumour.shape != labels.shape:
        raise ValueError(f"probabilities of shape {tumour.shape} do not match the label map's {labels.shape}")
    components, count = ndimage.label(labels > 0, structure=np.ones((3,) * labels.ndim))
    return tumour, components, count


def remove_unsure_tumours(labels, probs, max_voxels, min_peak):
    """Clear, with all its labels, every tumour component (labels > 0) that is both smaller than
    `max_voxels` voxels and whose peak tumour probability (tumour_probability of the region
    probabilities `probs`) stays below `min_peak`: a component the network is sure of somewhere, or
    a large one, is always kept. Components are 26-connected, so a fragment touching the tumour at
    an edge or corner is judged with it, not alone (and a component is what BraTS 2023's lesion-wise
    scoring calls a lesion). Either figure at 0 keeps everything. Returns a new map."""
    labels = np.array(labels)
    if max_voxels <= 0 or min_peak <= 0:
        return labels
    tumour, components, count = tumour_components(labels, probs, "eval.unsure_component_voxels")
    if count == 0:
        return labels
    index = np.arange(1, count + 1)
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    peaks = np.asarray(ndimage.maximum(tumour, components, index))
    labels[np.isin(components, index[(sizes < max_voxels) & (peaks < min_peak)])] = 0
    return labels


def remove_minor_tumours(labels, probs, share):
    """Clear, with all its labels, every tumour component (26-connected, labels > 0) whose probability
    mass (the sum of tumour_probability over its voxels) is below `share` of the largest component's.
    The network can be sure of a stray false positive (on real BraTS cases they peak at 0.99 like the
    tumour), but it holds a few percent of the tumour's mass; the main tumour is never removed, and a
    smaller second tumour only when it is a small share of the first. 0 keeps everything. A new map."""
    labels = np.array(labels)
    if share <= 0:
        return labels
    tumour, components, count = tumour_components(labels, probs, "eval.minor_component_share")
    if count <= 1:
        return labels
    index = np.arange(1, count + 1)
    mass = np.asarray(ndimage.sum(tumour, components, index))
    labels[np.isin(components, index[mass < share * mass.max()])] = 0
    return labels


def postprocess_labels(labels, task, eval_cfg, probs=None):
    """The configured postprocessing of a label map with the project's labels (ET = 4): tumour
    components first (eval.largest_component, eval.min_component_voxels, then
    eval.unsure_component_voxels with eval.unsure_component_peak and eval.minor_component_share, which
    read the region probabilities `probs`), so the ET rule (eval.postprocess_et_min) counts only the enhancing
    tumour that is kept."""
    if eval_cfg.largest_component:
        labels = keep_largest_tumour(labels)
    labels = remove_small_tumours(labels, eval_cfg.min_component_voxels)
    labels = remove_unsure_tumours(labels, probs, eval_cfg.unsure_component_voxels, eval_cfg.unsure_component_peak)
    labels = remove_minor_tumours(labels, probs, eval_cfg.minor_component_share)
    if task == "brats":
        labels = relabel_small_enhancing(labels, eval_cfg.postprocess_et_min)
    return labels


def label_map_regions(pred_regions, task, eval_cfg, probs=None):
    """Boolean (R, *spatial) regions of the postprocessed label map of thresholded `pred_regions`:
    the regions of the exported file (nested for brats), to be scored and exported. `probs`: the
    region probabilities they were thresholded from, needed only by eval.unsure_component_voxels and
    eval.minor_component_share."""
    labels = postprocess_labels(to_label_map(pred_regions, task), task, eval_cfg, probs)
    return labels_to_regions(labels, task_regions(task)).numpy() > 0.5


def threshold_regions(probs, eval_cfg):
    """Region probabilities (R, *spatial), a tensor on any device -> boolean numpy regions above
    eval.threshold, before any postprocessing."""
    return (probs > eval_cfg.threshold).cpu().numpy()


def predicted_regions(probs, task, eval_cfg):
    """Region probabilities -> the regions of their postprocessed label map: thresholded at
    eval.threshold, then label_map_regions. What is scored, exported and written by predict.py."""
    return label_map_regions(threshold_regions(probs, eval_cfg), task, eval_cfg, probs)
