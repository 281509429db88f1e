"""The two tiers: tests/conftest.py marks a test `slow` from what it uses (never by hand), and `make test-fast`
(`-m "not slow"`) runs the rest. Checked on tests whose needs are known."""
import pytest
from conftest import ALL_ITEMS, TIERS

EXPECTED = {  # test (node id suffix) -> the reasons it is slow (empty: fast)
    "test_loading.py::test_cached_conversion_reloads_fast_and_identically": {"smollm"},
    "test_loading.py::test_cli_demo_runs_on_a_tiny_model": {"subprocess"},
    "test_widgets.py::test_png_export": {"browser"},
    "test_notebooks.py::test_notebook_runs[01_quickstart]": {"notebook", "subprocess"},
    "test_study.py::test_ray_executor_gives_the_local_results_and_survives_lost_workers": {"ray"},
    "test_drilldown.py::test_prompt_effect_counts_only_the_users_tokens[smollm]": {"smollm"},
    "test_fresh_machine.py::test_the_wheel_works_outside_the_repository": {"subprocess"},
    "test_views_browser.py::test_long_prompt_clicks_are_fast_and_the_server_never_blocks": {"browser", "subprocess"},
    "test_layers.py::test_no_import_cycles_between_modules": set(),
    "test_hooks.py::test_activations_equal_transformerlens_bridge_cache": set(),
}


def test_known_tests_land_in_their_tier(request):
    items = {item.nodeid.split("/")[-1]: item for item in request.config.stash[ALL_ITEMS]}
    if len(items) < 100:
        pytest.skip("run with the whole suite collected (a single-file run does not see the other tests)")
    for node, want in EXPECTED.items():
        assert node in items, f"{node} is not collected: update EXPECTED"
        got = {m.name for m in items[node].iter_markers()} & set(TIERS)
        assert want <= got, (node, got)
        assert (items[node].get_closest_marker("slow") is not None) == bool(want), node
