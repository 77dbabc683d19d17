"""window: drop the oldest member."""

from .base import KERNEL_WINDOW, Policy, register


@register
class Window(Policy):
    name = "window"
    kernel_code = KERNEL_WINDOW

    def priority(self, score, acc, order):
        return order.float()

    def rolling_sinks(self):
        return 0  # a rolling buffer of the K most recent
