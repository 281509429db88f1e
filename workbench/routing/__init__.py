"""MoE routing: capture (``Routing``), the routing scan, analyses, interventions (``ExpertMask``,
``ExpertForce``, ``TopK``) and SCMoE contrastive decoding.

    import workbench as wb
    m = wb.load("tiny-moe")
    with wb.capture(m, wb.Routing()) as cap:
        m.forward_text("def add(a, b): return a + b")
    cap["blocks.1.mlp.router.experts"]           # [batch, row, k]
    wb.routing.expert_load(cap)                  # [layer, expert]
    r = wb.routing.scan(m)                       # labelled texts → RoutingResult (load, specialisation, margins)
    with wb.intervene(m, wb.ExpertMask([(1, 3)]), wb.TopK(1)):
        m.generate("2 + 2 =")
"""
from .analyses import (
    activation_rate,
    behaviour_experts,
    coactivation,
    expert_load,
    flip_risk,
    load_entropy,
    margin_histogram,
    position_dependence,
    risk_difference,
    risk_table,
    router_entropy,
    specialisation,
    token_specialisation,
    transitions,
)
from .contrastive import contrastive_logits, scmoe_generate
from .edits import ExpertForce, ExpertMask, TopK
from .probe import Routing, RoutingRows, routing_rows, rows
from .scan import RoutingConfig, RoutingResult, scan
from .rules import Decision, RuleInputs, route, rule_inputs

__all__ = [
    "Decision", "ExpertForce", "ExpertMask", "Routing", "RoutingConfig", "RoutingResult", "RoutingRows", "RuleInputs", "TopK",
    "activation_rate", "behaviour_experts", "coactivation", "contrastive_logits", "expert_load",
    "flip_risk", "load_entropy", "margin_histogram", "position_dependence", "risk_difference",
    "risk_table", "route", "router_entropy", "routing_rows", "rows", "rule_inputs", "scan", "scmoe_generate", "specialisation",
    "token_specialisation", "transitions",
]  # fmt: skip
