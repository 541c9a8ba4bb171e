"""``tpmlab gateway``'s flags reach the gateway's configuration."""

from __future__ import annotations

from tpmlab.cli import build_parser
from tpmlab.gateway.cli import config_from_args
from tpmlab.gateway.core import GatewayConfig


def test_session_limit_flags_reach_the_config():
    args = build_parser().parse_args(["gateway", "--max-session-traces", "3",
                                      "--max-session-invokes", "7",
                                      "--max-session-rows", "11",
                                      "--max-read-values", "5", "--no-cost-learning"])
    config = config_from_args(args)
    assert (config.max_session_traces, config.max_session_invokes,
            config.max_session_rows) == (3, 7, 11)
    assert config.max_read_values == 5 and not config.learn_costs


def test_without_flags_the_config_keeps_its_defaults():
    config = config_from_args(build_parser().parse_args(["gateway", "--cost-model", "0.01,0.001"]))
    default = GatewayConfig()
    assert (config.max_session_traces, config.max_session_invokes, config.max_session_rows) == \
        (default.max_session_traces, default.max_session_invokes, default.max_session_rows)
    assert config.cost_models["smollm2-135m"].seconds_per_token == 0.001
    assert config.max_read_values == default.max_read_values
    assert not config.learn_costs  # a pinned cost model is not learned
    assert config_from_args(build_parser().parse_args(["gateway"])).learn_costs


def test_batch_budget_flags_reach_the_config():
    args = build_parser().parse_args(["gateway", "--max-batch-requests", "4",
                                      "--max-batch-rows", "9", "--max-batch-cells", "4096",
                                      "--min-batch-fill", "0.6"])
    config = config_from_args(args)
    assert (config.max_batch_requests, config.max_batch_rows, config.max_batch_cells,
            config.min_batch_fill) == (4, 9, 4096, 0.6)
    default, plain = GatewayConfig(), config_from_args(build_parser().parse_args(["gateway"]))
    assert (plain.max_batch_requests, plain.max_batch_rows, plain.max_batch_cells,
            plain.min_batch_fill) == (default.max_batch_requests, default.max_batch_rows,
                                      default.max_batch_cells, default.min_batch_fill)
