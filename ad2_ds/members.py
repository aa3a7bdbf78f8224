"""The several-teacher settings of a :class:`~ad2_ds.run_config.RunConfig` (``--teacher A --teacher B``).

    check_members(config)                      # in RunConfig.__post_init__: counts, weights, hosted, deep KD source
    members = config.member_configs()          # one single-teacher RunConfig per member (its own teacher_ranks)
    groups = rank_groups(config)               # each member's hosted ranks (--teacher_ranks 0/1), () co-located
    index = hidden_source_index(config)        # the member that gives hidden states (deep KD), or None

Kept apart from :mod:`ad2_ds.run_ensemble` (which builds the ensemble) so the config imports nothing of the run layer.
"""

import dataclasses

from .config import ConfigError

PER_MEMBER = ("teacher_tp_size", "teacher_dtype", "teacher_cache", "teacher_seed")


def check_members(config) -> None:
    """The several-teacher settings checked together (a :class:`ConfigError` names the flag); lists become tuples
    and a one-value tuple its value, so one teacher is the run it always was."""

    def put(name, value):
        object.__setattr__(config, name, value)

    if isinstance(config.teacher, list):
        put("teacher", tuple(config.teacher))
    if isinstance(config.teacher, tuple) and len(config.teacher) <= 1:
        put("teacher", config.teacher[0] if config.teacher else None)
    n = max(len(config.teachers), 1)
    for name in PER_MEMBER:
        value = getattr(config, name)
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple):
            if len(value) == 1:
                value = value[0]
            elif len(value) != n:
                raise ConfigError(
                    name, f"has {len(value)} values for {n} teacher(s): give one value for all, or one per --teacher"
                )
        put(name, value)
    put("teacher_weights", tuple(float(w) for w in config.teacher_weights))
    if config.teacher_weights:
        from .teachers.ensemble import normalized_weights

        try:
            normalized_weights(config.teacher_weights, n)
        except ValueError as e:
            raise ConfigError("teacher_weights", str(e)) from None
    if config.teacher_rule not in ("mean", "confidence"):
        raise ConfigError("teacher_rule", f"{config.teacher_rule!r}: use mean or confidence")
    ranks = config.teacher_ranks
    nested = bool(ranks) and isinstance(ranks[0], tuple)
    if n == 1:
        if config.hidden_source_teacher is not None:
            raise ConfigError("hidden_source_teacher", "names a member of several teachers: with one, drop it")
        if nested and len(ranks) > 1:
            raise ConfigError("teacher_ranks", f"has {len(ranks)} rank groups ('/' separates them) for one teacher: "
                              "give its ranks as R,R")  # fmt: skip
        if nested:
            put("teacher_ranks", ranks[0])
        return
    cfg = config.objective
    if cfg.mixup:
        raise ConfigError(
            "mixup", f"labels new mixed points with one live teacher, and {n} teachers are given: use one"
        )
    if not cfg.needs_teacher:
        raise ConfigError("teacher", f"is given {n} times but method {cfg.method} uses no teacher: give one at most")
    _check_rank_groups(config, n, put)
    caches = config.teacher_cache
    folders = [c for c in caches if c] if isinstance(caches, tuple) else [caches] if caches else []
    if isinstance(caches, str) or len(set(folders)) < len(folders):
        raise ConfigError(
            "teacher_cache", f"with {n} teachers needs one folder per teacher (DIR,DIR; an empty entry: that "
            "member runs live): each is its own",
        )  # fmt: skip
    if isinstance(caches, tuple) and not folders:
        put("teacher_cache", None)
    if (cfg.needs_hidden_states or cfg.needs_attentions) and config.hidden_source_teacher is None:
        raise ConfigError(
            "hidden_source_teacher", f"is needed: method {cfg.method} matches a teacher's hidden states and {n} "
            "teachers are given; name the member that gives them (its --teacher value or its 0-based index)",
        )  # fmt: skip
    if config.hidden_source_teacher is not None:
        hidden_source_index(config)
    groups = rank_groups(config)
    for m, group in enumerate(groups):  # each hosted member's own checks (tp size, no cache beside its ranks)
        try:
            group and _member_config(config, m, groups)
        except ConfigError as e:
            raise ConfigError(
                e.field, f"{e.detail} (teacher {m + 1}, {config.teachers[m]}, on ranks {group})"
            ) from None


def _check_rank_groups(config, n, put) -> None:
    """--teacher_ranks with several teachers: one group per member ('/' between them; empty: co-located), and no
    rank hosting two members."""
    ranks = config.teacher_ranks
    if not ranks:
        return
    example = "/".join(["0"] + [""] * (n - 1))
    if not isinstance(ranks[0], tuple):
        raise ConfigError(
            "teacher_ranks", f"with {n} teachers takes one rank group per teacher, separated by '/' (an empty group: "
            f"that member runs co-located): {example} hosts the first teacher on rank 0",
        )  # fmt: skip
    if len(ranks) != n:
        raise ConfigError("teacher_ranks", f"has {len(ranks)} rank groups for {n} teachers: give one per --teacher, "
                          f"separated by '/' (e.g. {example})")  # fmt: skip
    from .dist import check_teacher_ranks

    flat = [r for group in ranks for r in group]
    try:
        check_teacher_ranks(flat)  # distinct and >= 0 across all members
    except ValueError:
        shown = "/".join(",".join(map(str, g)) for g in ranks)
        raise ConfigError("teacher_ranks", f"{shown}: every rank hosts one member at most, and ranks are >= 0: give "
                          "each hosted member ranks of its own") from None  # fmt: skip
    if not flat:
        put("teacher_ranks", ())
    elif config.teacher_cache:
        raise ConfigError("teacher_cache", "beside a hosted member is not supported yet (a cache is built over "
                          "every rank): run the cached member live, or drop --teacher_ranks")  # fmt: skip


def rank_groups(config) -> tuple:
    """Each member's hosted ranks in --teacher order (``()``: co-located); one teacher: ``(config.teacher_ranks,)``."""
    ranks, n = config.teacher_ranks, max(len(config.teachers), 1)
    if ranks and isinstance(ranks[0], tuple):
        return ranks
    return (ranks,) if n == 1 else ((),) * n


def hosted_ranks(config) -> tuple:
    """Every rank that hosts a teacher (the students train on the others), sorted."""
    return tuple(sorted(r for group in rank_groups(config) for r in group))


def hidden_source_index(config):
    """The member index named by ``hidden_source_teacher`` (None when not set)."""
    name, teachers = config.hidden_source_teacher, config.teachers
    if name is None:
        return None
    if name in teachers:
        return teachers.index(name)
    if str(name).isdigit() and int(name) < len(teachers):
        return int(name)
    raise ConfigError("hidden_source_teacher", f"{name!r} is none of the teachers {list(teachers)} nor an index")


def member_configs(config):
    """One single-teacher RunConfig per member (see :meth:`ad2_ds.run_config.RunConfig.member_configs`)."""
    if len(config.teachers) <= 1:
        return (config,)

    groups = rank_groups(config)
    return tuple(_member_config(config, m, groups) for m in range(len(config.teachers)))


def _member_config(config, m, groups):
    """Member m's single-teacher RunConfig (groups: :func:`rank_groups`)."""

    def pick(value):
        return (value[m] or None) if isinstance(value, tuple) else value  # "" in --teacher_cache ,DIR: live

    return dataclasses.replace(
        config,
        teacher=config.teachers[m],
        teacher_weights=(),
        teacher_rule="mean",
        hidden_source_teacher=None,
        teacher_ranks=groups[m],
        **{name: pick(getattr(config, name)) for name in PER_MEMBER},
    )
