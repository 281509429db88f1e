"""MoE routing: capture (``Routing``), analyses, interventions (``ExpertMask``, ``ExpertForce``,
``TopK``), SCMoE contrastive decoding and edit-effect reports.

    import workbench as wb
    m = wb.load("tiny-moe")
    with wb.capture(m, wb.Routing()) as cap:
        m.forward_text("def add(a, b): return a + b")
    cap["blocks.1.mlp.router.experts"]           # [batch, row, k]
    wb.routing.expert_load(cap)                  # [layer, expert]
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
    route_texts,
    router_entropy,
    specialisation,
    token_specialisation,
    transitions,
)
from .contrastive import contrastive_logits, scmoe_generate
from .edits import ExpertForce, ExpertMask, TopK
from .effects import EditEffect, edit_effect
from .hooks import hook_name
from .probe import Routing, RoutingRows, rows
from .rules import Decision, RuleInputs, route, rule_inputs

__all__ = [
    "Decision", "EditEffect", "ExpertForce", "ExpertMask", "Routing", "RoutingRows", "RuleInputs", "TopK",
    "activation_rate", "behaviour_experts", "coactivation", "contrastive_logits", "edit_effect", "expert_load",
    "flip_risk", "hook_name", "load_entropy", "margin_histogram", "position_dependence", "risk_difference",
    "risk_table", "route", "route_texts", "router_entropy", "rows", "rule_inputs", "scmoe_generate", "specialisation",
    "token_specialisation", "transitions",
]  # fmt: skip
