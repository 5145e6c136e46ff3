"""The sweep file: its model and run ids, its axes, overrides, loading and expansion into runs, its schema."""
