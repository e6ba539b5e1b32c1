"""QuantConfig: everything a run of the layer walk needs to know, one object passed around (the
weight grid itself is its `scheme`)."""
from dataclasses import asdict, dataclass, field

from .scheme import Scheme


@dataclass(frozen=True)
class QuantConfig:
    algorithm: str = "gptq"          # a name in algorithms.ALGORITHMS: gptq | awq | rtn
    scheme: Scheme = field(default_factory=Scheme)
    true_sequential: bool = True
    damp_percent: float = 0.01
    awq_grid: int = 20               # AWQ scale-search candidates
    awq_duo: str = "duo"             # "duo": identity + duo-scaled ratios; "both": half each; "plain"
    awq_clip: bool = True            # AWQ weight-clipping search
    search_dtype: str = "auto"       # AWQ block forwards: auto = bfloat16 where it is fast, else float32
    awq_search_tokens: int = 8192    # AWQ scale candidates are scored on the first batches up to this many
                                     # tokens (0: all); Hessians, mean |x| and clipping use every token
    expert_min_tokens: int = 128     # an MoE expert routed fewer calibration tokens takes the statistics of
                                     # every token its layer's experts receive (the report counts them)
    keep: tuple[str, ...] = ()       # module names (fnmatch patterns) left in 16 bits on purpose
    batch_size: int = 8              # calibration samples per forward

    def key(self) -> dict:
        """The settings that change the result (batch_size does not)."""
        d = asdict(self)
        d.pop("batch_size")
        d["scheme"] = self.scheme.as_dict()
        return d
