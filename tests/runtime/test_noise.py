"""lcmrt's seed -> noise generator (lcmrt/noise.py): Philox4x32-10 against Random123's known answers, the normal
transform against scipy, the layout rules, and the pipeline drawing through it."""
import numpy as np
import pytest
from scipy.special import ndtri as scipy_ndtri

from lcmrt.noise import FIRST_STEP_NOISE, LATENTS, MAX_SEED, STREAMS, _log, ndtri, philox4x32_10, standard_normal

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, output)
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32_10([np.array([c], np.uint64) for c in counter], key)
    assert tuple(int(w[0]) for w in words) == expected


def test_normal_transform_matches_scipy():
    p = np.concatenate([np.random.default_rng(0).random(100_000), np.logspace(-300, -1, 1000),
                        1 - np.logspace(-16, -1, 100), [0.5, 2.0 ** -53, 1 - 2.0 ** -53]])
    reference = scipy_ndtri(p)
    assert np.max(np.abs(ndtri(p) - reference) / np.maximum(np.abs(reference), 1e-300)) < 5e-15
    x = np.logspace(-300, 300, 10_000)
    assert np.max(np.abs(_log(x) - np.log(x)) / np.abs(np.log(x))) < 1e-15


def test_layout_images_streams_seeds():
    four = standard_normal(7, LATENTS, (4, 4, 9, 7))
    assert four.dtype == np.float32 and four.shape == (4, 4, 9, 7)
    np.testing.assert_array_equal(standard_normal(7, LATENTS, (1, 4, 9, 7))[0], four[0])  # image 0 whatever the count
    np.testing.assert_array_equal(standard_normal(7, LATENTS, (3, 4, 9, 7))[2], four[2])
    assert not np.array_equal(four[0], four[1])
    assert not np.array_equal(standard_normal(7, FIRST_STEP_NOISE, (1, 4, 9, 7))[0], four[0])
    assert not np.array_equal(standard_normal(8, LATENTS, (1, 4, 9, 7))[0], four[0])
    assert sorted(STREAMS.values()) == [0, 1, 2] and FIRST_STEP_NOISE > max(STREAMS.values())
    for seed in (0, MAX_SEED):
        assert np.isfinite(standard_normal(seed, 3, (1, 5))).all()
    with pytest.raises(ValueError, match="outside"):
        standard_normal(MAX_SEED + 1, 0, (1, 1))


def test_standard_normal_statistics():
    values = standard_normal(123, 5, (1, 1_000_000)).astype(np.float64)
    assert abs(values.mean()) < 0.005 and abs(values.std() - 1) < 0.005
    assert abs((values ** 3).mean()) < 0.02 and abs((values ** 4).mean() - 3) < 0.05
    # neighbouring values (two halves of one Philox block, and adjacent blocks) are uncorrelated
    assert abs(np.corrcoef(values[0, :-1], values[0, 1:])[0, 1]) < 0.005


def test_pipeline_draws_from_the_generator(tiny_engine):
    from lcmrt import Pipeline

    pipe = Pipeline.load(tiny_engine, backend="onnxruntime")
    shape = (1, 4, 16, 16)
    explicit = pipe("a fox", num_inference_steps=3, output="np", latents=standard_normal(11, LATENTS, shape),
                    step_noise=[standard_normal(11, FIRST_STEP_NOISE + i, shape) for i in range(2)])
    np.testing.assert_array_equal(pipe("a fox", num_inference_steps=3, seed=11, output="np"), explicit)
    three = pipe("a fox", num_inference_steps=3, seed=11, num_images=3, output="np")
    np.testing.assert_array_equal(three[0], explicit[0])  # image 0 of a seed, however many are drawn
