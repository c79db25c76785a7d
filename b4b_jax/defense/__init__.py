"""B4B defense (pure JAX): LSH coverage, cost, per-user noise and transforms, and the defended API.

See docs/defense.md for the semantics.
"""
from b4b_jax.defense.config import HARDENED, TRANSFORMS, defense_config, out_dim, validate_config
from b4b_jax.defense.cost import PRESETS, noise_std
from b4b_jax.defense.errors import (BadInputError, CorruptCheckpointError, DefenseError,
                                    NoCheckpointError, UnknownUserError)
from b4b_jax.defense.keys import uid_from_name
from b4b_jax.defense.state import (DefenseParams, DefenseState, grow_state, init_state, make_params,
                                   set_uid, state_bytes_per_user)
from b4b_jax.defense.step import defense_step, defense_step_impl, replay_step
from b4b_jax.defense.transforms import (apply_user_transform, invert_user_transform,
                                        user_transform_params)
from b4b_jax.defense.api import DefendedEncoder, QueryResult  # noqa: E402  (imports the modules above)
