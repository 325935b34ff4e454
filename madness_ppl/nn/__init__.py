"""Neural networks of the galaxy prior, as pure functions over parameter pytrees.

Only this subpackage (and :mod:`madness_ppl.prior`) knows about haiku: the VAE encoder/decoder
(:mod:`madness_ppl.nn.vae`) and the RealNVP flow over the latent space
(:mod:`madness_ppl.nn.flow`).
"""

from madness_ppl.nn.flow import (
    FlowConfig,
    flow_forward,
    flow_inverse,
    flow_log_prob,
    flow_sample,
    init_flow,
    standard_normal_log_prob,
)
from madness_ppl.nn.vae import (
    EncoderOutput,
    NetworkConfig,
    decode,
    encode,
    init_decoder,
    init_encoder,
    kl_to_standard_normal,
    sample_latent,
)

__all__ = [
    "EncoderOutput",
    "FlowConfig",
    "NetworkConfig",
    "decode",
    "encode",
    "flow_forward",
    "flow_inverse",
    "flow_log_prob",
    "flow_sample",
    "init_decoder",
    "init_encoder",
    "init_flow",
    "kl_to_standard_normal",
    "sample_latent",
    "standard_normal_log_prob",
]
