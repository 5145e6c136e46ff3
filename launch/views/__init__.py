"""What a person sees of a sweep: status, results and plan tables, aggregates over seeds, figures, the HTML report."""
