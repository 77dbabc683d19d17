"""window: drop the oldest member."""

from .base import Policy


class Window(Policy):
    name = "window"

    def priority(self, score, acc, order):
        return order.float()
