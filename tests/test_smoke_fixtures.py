def test_tiny_bundle_trains_and_moves_samples(tiny_bundle):
    m = tiny_bundle.metrics
    assert m["target_model_accuracy"] >= 0.9
    assert m["perturbation_accuracy_non_target"] >= 0.9
