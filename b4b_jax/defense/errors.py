"""The defended API's typed errors, so a server maps each to an HTTP status without parsing messages.

  DefenseError            ValueError; base of the three below (catch it for "the call was refused")
    BadInputError         the caller's arguments: shapes, dtypes, NaN/Inf, bad user names or types,
                          bad journal entries, more users in one call than the API serves at once -> 400
    UnknownUserError      a user that is not registered where registration is required -> 404/403
    CorruptCheckpointError a defense checkpoint that exists but is damaged, edited or inconsistent;
                          never silently replaced by a fresh state -> 500 at start-up
  NoCheckpointError       FileNotFoundError: there is genuinely no checkpoint at the path (a caller may
                          start fresh on this one, and only on this one)

Every refused call leaves the defense state, the registry and the counters bit-identical.
"""


class DefenseError(ValueError):
  """A call the defended API refused; the state is unchanged."""


class BadInputError(DefenseError):
  """Invalid arguments (shape, dtype, non-finite values, user names, journal entries)."""


class UnknownUserError(DefenseError):
  """The user is not registered (and this API requires registration, or the call reads its state)."""


class CorruptCheckpointError(DefenseError):
  """A defense checkpoint exists but is damaged, edited, or inconsistent with itself."""


class NoCheckpointError(FileNotFoundError):
  """There is no defense checkpoint at the path (nothing was ever saved there)."""
