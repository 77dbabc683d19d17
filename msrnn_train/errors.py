"""The errors and warnings a recipe run reports (a leaf module: every other module may raise them)."""


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the (dotted) key and what is allowed."""


class RecipeWarning(UserWarning):
    """A recipe that runs but probably not as intended (e.g. a budget that never evicts)."""
