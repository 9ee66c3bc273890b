"""GLM (transformers' native ``glm``, e.g. ``THUDM/glm-4-9b-chat-1m-hf``): the generic layout, every layer full causal
attention. Its partial rotary embedding runs before the attention function, which sees q and k after it. The
remote-code checkpoints (``model_type`` ``chatglm``, e.g. ``THUDM/glm-4-9b-chat-1m``) are not native and have no
adapter."""

from .base import Adapter

ADAPTER = Adapter("glm")
