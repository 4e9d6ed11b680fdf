"""fastxmc's measuring instruments (no pretrained weights are downloaded, ever).

- :mod:`fastxmc.eval.metrics`: FID from streaming feature statistics, KID, Inception Score and
  R-precision (AttnGAN protocol), independent of the feature extractor.
- :mod:`fastxmc.eval.diversity`: precision / recall (Kynkäänniemi et al.) and density / coverage
  (Naeem et al.) from k-NN balls in a feature space, and the per-caption spread of G's samples
  across noise against that of real images of one label or caption.
- :mod:`fastxmc.eval.inception`: InceptionV3 features and logits from a local weights file
  (pytorch-fid / torch-fidelity's TF-ported network or a torchvision state dict).
- :mod:`fastxmc.eval.attributes`: the shapes attribute classifier, trained once on real images
  and cached, scoring shape / color / size / position of generated images.
- The dual encoder (R-precision, and ``fid_dual`` without Inception weights) is
  :mod:`fastxmc.models.dual_encoder`.
"""
from fastxmc.eval.attributes import (AttributeAccuracy, AttributeClassifier, AttributeClassifierConfig,
                                     attribute_accuracy, ensure_attribute_classifier, is_single_object)
from fastxmc.eval.diversity import (density_coverage, prdc, precision_recall, real_spread_groups,
                                    z_spread)
from fastxmc.eval.inception import InceptionV3, load_inception
from fastxmc.eval.metrics import (FeatureStats, fid_from_stats, frechet_distance, inception_score,
                                  kernel_inception_distance, r_precision, r_precision_from_scores)

__all__ = [
    "FeatureStats", "frechet_distance", "fid_from_stats", "kernel_inception_distance",
    "inception_score", "r_precision", "r_precision_from_scores", "InceptionV3", "load_inception",
    "AttributeClassifier", "AttributeClassifierConfig", "AttributeAccuracy", "attribute_accuracy",
    "ensure_attribute_classifier", "is_single_object", "prdc", "precision_recall", "density_coverage",
    "z_spread", "real_spread_groups",
]
