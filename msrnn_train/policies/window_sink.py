"""window_sink: drop the oldest member (as `window`), and attend with a learned attention sink.

The eviction rule is `window`'s. What differs is the attention of a bounded layer: besides the
held members C_t, query t's softmax has one virtual key per query head h whose logit is a trained
number s_h (gpt-oss / GraniteSWA's `sinks`) and whose value is a trained vector u_g per key/value
head g (zero, gpt-oss's form, with `budget.sink_value: false`):

    out_t = (exp(s_h) u_g + sum_j exp(l_tj) v_j) / (exp(s_h) + sum_j exp(l_tj))        (j in C_t)

so a head may put mass "nowhere" instead of on the recent tokens, which is what the first tokens
(the attention sinks that `sinks` keeps) are for in a pretrained model, at no state cost: the
state is still the K most recent keys. Unbounded layers (a hybrid's) have no sink. The logits
and values live in `msrnn_train/sink.py` (one `AttentionSink` per bounded layer, saved beside the adapter);
stock transformers serves the result as `GraniteSWAForCausalLM` (msrnn_train/export.py).
"""

from .base import register
from .window import Window


@register
class WindowSink(Window):
    name = "window_sink"
    attention_sink = True
