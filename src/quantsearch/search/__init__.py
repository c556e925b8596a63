"""Search: the pymoo problem over bit-widths, its costs and evaluator, and the algorithms that search it."""
