"""Frozen-feature evaluation: k-NN and the ridge probe on hand-made data, then a short trained
model against its random-init twin on the embedded digits."""
import numpy as np
import pytest

from crate_jax import evaluate, train
from crate_jax.training import probes
from tests.helpers import tiny_config


def clusters(n, d=16, classes=4, spread=0.3, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, d)) * 3
  y = rng.integers(0, classes, n)
  return centres[y] + spread * rng.normal(size=(n, d)), y


def test_knn_votes_by_similarity_weight():
  unit = lambda deg: [np.cos(np.radians(deg)), np.sin(np.radians(deg))]
  # class 1 at cos 0.99 to the query; two class-0 examples at cos 0.98 (+-11.5 degrees)
  train_x = np.array([unit(11.48), unit(-11.48), unit(8.11)]) * [[2.0], [0.5], [3.0]]
  train_y = np.array([0, 0, 1])
  query = np.array([[5.0, 0.0]])
  # k = 1: the nearest (class 1) alone; k = 3: 2 exp(0.98/T) > exp(0.99/T) at T = 0.07
  assert probes.knn_predict(train_x, train_y, query, num_classes=2, k=1).tolist() == [1]
  assert probes.knn_predict(train_x, train_y, query, num_classes=2, k=3).tolist() == [0]
  # a colder temperature lets the nearest win again: exp(0.01/T) > 2 for T < 0.0144
  assert probes.knn_predict(train_x, train_y, query, num_classes=2, k=3,
                            temperature=0.01).tolist() == [1]


def test_knn_and_ridge_probe_separate_clusters():
  x, y = clusters(600)
  x2, y2 = clusters(800, seed=0)  # same centres and generator: the last 200 are unseen
  x2, y2 = x2[600:], y2[600:]
  assert np.mean(probes.knn_predict(x, y, x2, num_classes=4) == y2) == 1.0
  pred, lam = probes.linear_probe_predict(x, y, x2, num_classes=4)
  assert np.mean(pred == y2) == 1.0 and lam in probes.RIDGE_GRID
  # labels unrelated to the features: both stay near chance (0.25)
  shuffled = np.random.default_rng(3).permutation(y)
  pred, _ = probes.linear_probe_predict(x, shuffled, x2, num_classes=4)
  assert np.mean(pred == y2) < 0.5


def test_pool():
  tokens = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(probes.pool(tokens, "cls"), tokens[:, 0])
  np.testing.assert_array_equal(probes.pool(tokens, "mean"), tokens.mean(1))
  with pytest.raises(ValueError, match="pool"):
    probes.pool(tokens, "max")


def test_trained_features_beat_random_init(tmp_path):
  cfg = tiny_config(tmp_path / "tfds", num_train_steps=60, eval_every_steps=60,
                    **{"optimizer.lr": 3e-3})
  train.train_and_evaluate(cfg, str(tmp_path / "run"))
  scores = {}
  for protocol in ("knn", "linear"):
    trained = evaluate.frozen_feature_eval(cfg, str(tmp_path / "run"), protocol, layers="all")
    random = evaluate.frozen_feature_eval(cfg, None, protocol, layers="all")
    scores[protocol] = (trained["per_layer"], random["per_layer"])
    assert trained["num_train"] == 4000 and trained["num_test"] == 1000
    assert len(trained["per_layer"]) == 2 and trained["top1"] == trained["per_layer"][-1]
    assert trained["top1"] > random["top1"] + 0.1, scores
  path = evaluate.per_layer_figure({"trained": scores["knn"][0], "random": scores["knn"][1]},
                                   str(tmp_path / "probe.png"))
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="out of range for a 2-layer model"):
    evaluate.frozen_feature_eval(cfg, None, "knn", layers="5")
