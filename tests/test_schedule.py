import pytest
import torch
from diffusers import DDPMScheduler

from fastperc import FlowMatchingSchedule, NoiseSchedule, VPSchedule


@pytest.mark.parametrize("rescale", [True, False])
def test_scaled_linear_matches_diffusers_ddpm(rescale):
    ours = NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=rescale)
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           rescale_betas_zero_snr=rescale)
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_cosine_matches_diffusers_squaredcos():
    ours = NoiseSchedule.cosine()
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_linear_matches_diffusers_linear():
    assert torch.allclose(NoiseSchedule.linear().alphas_cumprod,
                          DDPMScheduler(beta_schedule="linear").alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_zero_terminal_snr_ends_at_zero_and_decreases():
    ac = NoiseSchedule.scaled_linear().alphas_cumprod
    assert ac.shape == (1000,) and ac[-1] == 0 and ac[0] > 0.99
    assert (ac[1:] <= ac[:-1]).all()


def test_from_diffusers_reads_alphas_and_prediction_type():
    sched = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", num_train_timesteps=500)
    ours = NoiseSchedule.from_diffusers(sched)
    assert ours.prediction_type == "v_prediction" and ours.num_train_timesteps == 500
    assert torch.equal(ours.alphas_cumprod, sched.alphas_cumprod.double())


def test_from_diffusers_rejects_objects_without_alphas_cumprod():
    with pytest.raises(TypeError, match="scheduler"):
        NoiseSchedule.from_diffusers(object())


def test_alpha_sigma_are_sqrt_abar_and_sqrt_one_minus():
    s = NoiseSchedule.scaled_linear()
    t = torch.randint(0, 1000, (16,))
    a, sig = s.alpha_sigma(t, torch.float64)
    assert torch.allclose(a**2 + sig**2, torch.ones(16, dtype=torch.float64))
    assert torch.allclose(a, s.alphas_cumprod[t].sqrt())


@pytest.mark.parametrize("ours, theirs", [("add_noise", "add_noise"), ("velocity", "get_velocity")])
def test_noising_and_velocity_match_diffusers(ours, theirs):
    sched = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    s = NoiseSchedule.from_diffusers(sched)
    x0, eps = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.randint(0, 1000, (6,))
    assert torch.allclose(getattr(s, ours)(x0, eps, t), getattr(sched, theirs)(x0, eps, t), atol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_convert_recovers_x0_and_noise_from_exact_prediction(kind):
    s = NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=kind != "epsilon")  # epsilon needs alpha > 0
    x0, eps = torch.randn(8, 1, 4, 4, dtype=torch.float64), torch.randn(8, 1, 4, 4, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,))
    x_t = s.add_noise(x0, eps, t)
    x0_hat, eps_hat = s.convert(x_t, s.target(x0, eps, t, kind), t, kind)
    assert torch.allclose(x0_hat, x0, atol=1e-8) and torch.allclose(eps_hat, eps, atol=1e-8)


def test_renoise_coefficients_are_identity_when_t_prime_equals_t():
    s = NoiseSchedule.scaled_linear()
    t = torch.randint(0, 1000, (32,))
    a, b, _, _ = s.renoise_coefficients(t, t, "v_prediction", torch.float64)
    assert torch.allclose(a, torch.ones_like(a), atol=1e-12) and torch.allclose(b, torch.zeros_like(b), atol=1e-12)


EPS_ON_ZERO_SNR = "prediction_type: 'epsilon' cannot be converted where alpha_t = 0 .* at timesteps \\[999\\]"


def test_epsilon_on_a_zero_snr_table_is_refused_when_built_not_mid_run():
    with pytest.raises(ValueError, match=EPS_ON_ZERO_SNR):
        NoiseSchedule.scaled_linear(prediction_type="epsilon")
    with pytest.raises(ValueError, match=EPS_ON_ZERO_SNR):  # a diffusers config users do write
        NoiseSchedule.from_diffusers(DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True))
    s = NoiseSchedule.scaled_linear()  # v-prediction: fine; asking it for epsilon is refused for any t
    with pytest.raises(ValueError, match=EPS_ON_ZERO_SNR):
        s.renoise_coefficients(torch.tensor([5, 6]), torch.tensor([3, 4]), "epsilon")


def test_epsilon_on_sd15_table_is_finite_at_the_last_step():
    s = NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=False, prediction_type="epsilon")
    a, b, _, _ = s.renoise_coefficients(torch.tensor([5, 999]), torch.tensor([3, 4]), "epsilon")
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and float(a.abs().max()) < 20


def test_large_conversion_coefficients_are_warned_once_when_checked():
    ac = torch.linspace(0.9999, 1e-6, 100, dtype=torch.float64)  # alpha_min = 1e-3: 1/alpha = 1000
    with pytest.warns(RuntimeWarning, match=r"conversion coefficients reach 1000 \(> 100\) at timesteps"):
        s = VPSchedule(ac, prediction_type="epsilon")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.renoise_coefficients(torch.tensor([5, 99]), torch.tensor([3, 4]), "epsilon")  # no second warning


@pytest.mark.parametrize("bad, exc, match", [
    (torch.tensor([[0.9, 0.5]]), ValueError, "alphas_cumprod"),
    (torch.tensor([0.9, 1.5]), ValueError, "alphas_cumprod"),
    (torch.tensor([1, 0]), TypeError, "alphas_cumprod"),
])
def test_bad_alphas_cumprod_raise(bad, exc, match):
    with pytest.raises(exc, match=match):
        VPSchedule(bad)


def test_unknown_prediction_type_raises():
    with pytest.raises(ValueError, match="prediction_type.*'x_start'"):
        NoiseSchedule.scaled_linear(prediction_type="x_start")


def test_add_noise_rejects_out_of_range_timesteps():
    s = NoiseSchedule.scaled_linear()
    with pytest.raises(ValueError, match=r"timesteps: expected values in \[0, 999\]"):
        s.add_noise(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([0, 1000]))


# ---- the protocol: two siblings, every caller uses its methods only ---------------------------------
SIBLINGS = {"vp": lambda: NoiseSchedule.scaled_linear(), "flow": lambda: NoiseSchedule.flow_matching(shift=3.0)}


@pytest.mark.parametrize("kind", SIBLINGS)
def test_every_public_attribute_of_either_schedule_answers(kind):
    s = SIBLINGS[kind]()
    assert isinstance(s, NoiseSchedule)
    for name in dir(s):
        if not name.startswith("_"):
            getattr(s, name)  # no property that raises (as an inherited table did before)
    abstract = {n for n in dir(NoiseSchedule) if getattr(getattr(NoiseSchedule, n), "__isabstractmethod__", False)}
    assert abstract and not getattr(type(s), "__abstractmethods__", None)
    assert abstract <= set(dir(s))


def test_the_siblings_are_not_each_other():
    vp, flow = SIBLINGS["vp"](), SIBLINGS["flow"]()
    assert isinstance(vp, VPSchedule) and not isinstance(vp, FlowMatchingSchedule)
    assert isinstance(flow, FlowMatchingSchedule) and not isinstance(flow, VPSchedule)
    assert not hasattr(flow, "alphas_cumprod")  # a flow table has no variance-preserving table to give


def test_the_old_constructor_name_builds_a_vp_schedule_with_a_deprecation_warning():
    ac = NoiseSchedule.scaled_linear().alphas_cumprod
    with pytest.warns(DeprecationWarning, match="use VPSchedule"):
        s = NoiseSchedule(ac, prediction_type="v_prediction")
    assert type(s) is VPSchedule and torch.equal(s.alphas_cumprod, ac) and s.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="alphas_cumprod"), pytest.warns(DeprecationWarning):
        NoiseSchedule(torch.tensor([0.9, 1.5]))


@pytest.mark.parametrize("kind", SIBLINGS)
def test_the_timestep_table_is_ordered_both_ways(kind):
    s = SIBLINGS[kind]()
    by_noise = s.timesteps_by_noise()
    assert torch.equal(by_noise, s.timesteps.flip(0)) and by_noise.shape == (s.num_train_timesteps,)
    _, sigma = s.alpha_sigma(by_noise, torch.float64)
    assert bool((sigma[1:] >= sigma[:-1]).all())  # increasing noise
    assert by_noise.dtype == (torch.float32 if kind == "flow" else torch.int64)


@pytest.mark.parametrize("kind", SIBLINGS)
def test_a_sampler_step_reaches_x0_and_stepping_to_the_same_timestep_stays_put(kind, gen):
    s = SIBLINGS[kind]()
    x0, eps = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=gen,
                                                                                          dtype=torch.float64)
    t = s.sampling_timesteps(4)[1:4]
    x_t = s.add_noise(x0, eps, t)
    exact = s.target(x0, eps, t)  # a perfect model
    torch.testing.assert_close(s.sampler_step(x_t, exact, t, None), x0)
    torch.testing.assert_close(s.sampler_step(x_t, exact, t, t), x_t)
    t_next = s.sampling_timesteps(4)[[2, 3, 3]]
    torch.testing.assert_close(s.sampler_step(x_t, exact, t, t_next), s.add_noise(x0, eps, t_next))


@pytest.mark.parametrize("kind", SIBLINGS)
def test_sampling_timesteps_refuse_bad_step_counts(kind):
    s = SIBLINGS[kind]()
    for bad in (0, s.num_train_timesteps + 1, 2.5, True):
        with pytest.raises(ValueError, match="steps: expected an int in 1..1000"):
            s.sampling_timesteps(bad)


def test_add_noise_without_checks_gives_what_the_checked_call_gives(gen):
    s = NoiseSchedule.scaled_linear()
    x0, eps, t = torch.randn(2, 1, 4, 4, generator=gen), torch.randn(2, 1, 4, 4, generator=gen), torch.tensor([3, 998])
    assert torch.equal(s.add_noise(x0, eps, t, check=False), s.add_noise(x0, eps, t))


def test_each_kind_of_schedule_names_the_sampler_its_step_is():
    from fastperc import NoiseSchedule

    assert NoiseSchedule.scaled_linear().sampler == "DDIM"
    assert NoiseSchedule.flow_matching(shift=3.0).sampler == "Euler"
