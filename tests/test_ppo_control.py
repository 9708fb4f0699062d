"""PPO's numpy side: the KL controllers, running moments, score shaping and the buffer."""

from __future__ import annotations

import numpy as np
import pytest

from mlxpost.algorithms.ppo import PPOConfig, rollout_buffer, sequence_kl, shaped_scores
from mlxpost.algorithms.ppo_control import KLController, RunningMoments
from mlxpost.errors import UserError


def test_adaptive_kl_follows_ziegler_et_al():
    controller = KLController(0.1, target=6.0, horizon=10_000)
    controller.update(kl=12.0, rollouts=32)  # error 1.0, clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 32 / 10_000))
    controller.update(kl=5.4, rollouts=64)  # error -0.1
    assert controller.value == pytest.approx(
        0.1 * (1 + 0.2 * 32 / 10_000) * (1 - 0.1 * 64 / 10_000)
    )
    controller.update(kl=0.0, rollouts=100)  # error -1, clipped to -0.2
    assert controller.value < 0.1


def test_adaptive_kl_settles_near_its_target():
    """KL falling as the coefficient rises: the coefficient moves until KL reaches the target."""
    controller = KLController(0.05, target=2.0, horizon=200)
    for _ in range(400):
        controller.update(kl=0.4 / controller.value, rollouts=32)
    assert 0.4 / controller.value == pytest.approx(2.0, rel=0.05)


def test_fixed_kl_never_moves():
    controller = KLController(0.2)
    controller.update(kl=100.0, rollouts=32)
    assert controller.value == 0.2 and not controller.adaptive


def test_running_moments_equal_the_moments_of_everything_seen():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3, 2, size=n) for n in (5, 1, 17, 8)]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    everything = np.concatenate(chunks)
    assert moments.mean == pytest.approx(everything.mean())
    assert moments.std == pytest.approx(everything.std())
    np.testing.assert_allclose(moments.denormalise(moments.normalise(everything)), everything)
    restored = RunningMoments()
    restored.load_state(moments.state())
    assert restored.state() == moments.state()


def test_shaped_scores():
    cfg = PPOConfig(
        reward_model="rm", reward_model_weight=2.0, reward_clip=1.0, missing_eos_penalty=0.5
    )
    cfg.length_penalty = 0.01
    moments = RunningMoments()
    model_scores = np.array([-5.0, 5.0, 0.0, 0.0])
    rules = np.array([1.0, 0.0, 0.0, 1.0])
    finished = np.array([True, True, False, True])
    lengths = np.array([10, 20, 128, 5])
    got = shaped_scores(model_scores, rules, finished, lengths, cfg, moments)
    z = np.clip((model_scores - model_scores.mean()) / model_scores.std(), -1, 1)
    expected = rules + 2.0 * z - 0.5 * ~finished - 0.01 * lengths
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # without moments the raw score is used (clipped)
    raw = shaped_scores(model_scores, rules, finished, lengths, cfg, None)
    np.testing.assert_allclose(
        raw, rules + 2.0 * np.clip(model_scores, -1, 1) - 0.5 * ~finished - 0.01 * lengths
    )


def test_buffer_with_normalised_values():
    cfg = PPOConfig(gamma=1.0, lam=1.0, whiten_advantages=False)
    mask = np.array([[0, 1, 1, 1], [0, 1, 1, 0]], np.float32)
    rollout = {
        "input_ids": np.zeros((2, 4), np.int32),
        "attention_mask": np.ones((2, 4), np.int32),
        "loss_mask": mask,
        "old_logprobs": np.zeros((2, 4), np.float32),
    }
    kl = np.array([[0, 0.1, 0.2, 0.3], [0, 0.5, 0.5, 0]]) * mask
    moments = RunningMoments()
    moments.update(np.array([1.0, 3.0]))  # mean 2, std 1
    outputs = np.full((2, 4), 0.5)  # normalised: a value of 2.5
    buffer, raw = rollout_buffer(rollout, np.array([1.0, 2.0]), kl, 0.5, outputs, cfg, moments)
    np.testing.assert_allclose(raw["values"], 2.5 * mask)
    # lambda 1: returns are the rewards to go (score at the last token, -0.5 * KL per token)
    expected_returns = np.array([[0, 1 - 0.3, 1 - 0.25, 1 - 0.15], [0, 2 - 0.5, 2 - 0.25, 0]])
    np.testing.assert_allclose(raw["returns"], expected_returns, atol=1e-12)
    np.testing.assert_allclose(buffer["old_values"], 0.5 * mask)
    np.testing.assert_allclose(
        buffer["returns"], moments.normalise(expected_returns) * mask, rtol=1e-5, atol=1e-6
    )
    assert moments.count == 2 + 5
    assert sequence_kl(kl) == pytest.approx((0.6 + 1.0) / 2)


def test_reward_options():
    assert PPOConfig().rewards == "math,format"
    assert PPOConfig(reward_model="rm").rewards == "none"
    assert PPOConfig(reward_model="rm", rewards="math").rewards == "math"
    with pytest.raises(UserError, match="needs --reward-model"):
        PPOConfig(rewards="none")
    with pytest.raises(UserError, match="needs --reward-model"):
        PPOConfig(critic="reward_model")


def test_reward_model_critic_starts_from_the_reward_models_weights(tiny_dir, tmp_path):
    """--critic reward_model: the critic's adapter and head are the reward model's, trainable."""
    import json

    from mlxpost.algorithms.ppo import make_critic
    from mlxpost.backend import LoraConfig, get_backend
    from mlxpost.run import save_arrays

    backend = get_backend("torch")
    base = str(tiny_dir / "tiny-gpt2")
    reward_model = backend.load_model(base)
    backend.attach_scalar_head(reward_model, seed=5)
    backend.attach_lora(reward_model, LoraConfig(rank=4, alpha=8.0))
    rng = np.random.default_rng(0)
    trained = {
        name: rng.normal(size=value.shape).astype(np.float32)
        for name, value in backend.parameters(reward_model, trainable_only=True).items()
    }
    backend.set_parameters(reward_model, trained)
    directory = tmp_path / "rm"
    directory.mkdir()
    backend.save_adapter(reward_model, str(directory))
    save_arrays(str(directory / "trainable.npz"), trained)
    info = {"kind": "reward_model", "base_model": base, "lora": True, "max_length": 64}
    (directory / "reward_model.json").write_text(json.dumps(info))
    cfg = PPOConfig(model=base, reward_model=str(directory), critic="reward_model")
    critic, optimizer = make_critic(backend, cfg)
    loaded = backend.parameters(critic, trainable_only=True)
    assert set(loaded) == set(trained)
    for name, value in trained.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert optimizer is not None
