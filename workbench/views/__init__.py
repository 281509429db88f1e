"""The views: notebook widgets (anywidget), the Panel dashboard and the HTML report. They show what the
layers below compute."""
