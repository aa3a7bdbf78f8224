"""The settings the cheaper ascents (:mod:`ad2_ds.ascent`) run with, checked by ``AD2Config.__post_init__``.

    checks += ascent_checks(cfg)   # (ok, message) pairs

Apart from :mod:`ad2_ds.ascent` (which needs torch and the config) so the config can check them without a circle.
"""


def ascent_checks(cfg) -> list:
    """(ok, message) pairs for AD2Config.__post_init__: the settings the cheaper ascents run with."""
    cheap = cfg.ascent != "kl" and cfg.adversarial
    return [
        (
            not cheap or (cfg.perturbation == "pga" and cfg.pga_steps == 1 and not cfg.random_start),
            f"ascent {cfg.ascent} takes one pga step from its start: use perturbation pga, pga_steps 1, no "
            "random_start (or ascent kl)",
        ),
        (not cheap or cfg.fast_pga, f"naive_pga is a variant of ascent kl, not of {cfg.ascent}"),
        (not cheap or cfg.epsilon > 0, "the epsilon = 0 control runs no ascent: use ascent kl with it"),
        (
            not (cheap and cfg.ascent == "free" and cfg.random_direction),
            "random_direction is a control of ascents kl and clean_grad (free steps the delta it applies)",
        ),
        (
            not cheap or cfg.epsilon_schedule == "constant",
            f"ascent {cfg.ascent} keeps epsilon constant: use epsilon_schedule constant, or ascent kl",
        ),
        (
            cfg.free_delta_budget_gb is None or cfg.free_delta_budget_gb > 0,
            f"free_delta_budget_gb must be > 0, got {cfg.free_delta_budget_gb}",
        ),
    ]
