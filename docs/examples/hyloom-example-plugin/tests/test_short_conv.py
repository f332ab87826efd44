"""The plugin's own tests: hyloom.testing runs the mixer contract on a tiny model built from a blueprint.

    pip install ./docs/examples/hyloom-example-plugin
    HYLOOM_STRICT_PLUGINS=1 pytest docs/examples/hyloom-example-plugin/tests
"""

from hyloom.testing import check_decode, check_mixer, tiny_model


def test_short_conv_keeps_the_mixer_contract(tmp_path):
    # decode equality, left padding, a clear refusal of packed sequences (no `varlen`), checkpoint round trip
    check_mixer(tiny_model({"type": "short_conv", "kernel": 3}), tmp_path)


def test_short_conv_between_attention_layers(tmp_path):
    model = tiny_model({"type": "short_conv", "kernel": 2}, n_layers=3, layout="MAM",
                       mixers={"A": {"type": "attention", "heads": 2}})
    check_mixer(model, tmp_path)


def test_a_long_decode_keeps_only_the_last_tokens():
    check_decode(tiny_model({"type": "short_conv", "kernel": 4}), prompt=2, steps=12)
