"""Reports of results folders: methods side by side with gains over the unadapted model
(compare.py, baseline.py), the cost table (costs.py), the per-step curve (table.py), PNG
plots and a self-contained index.html. Entry point: `build_report`."""

from pipeline.report.build import FORMATS, TABLES, ReportSummary, build_report, format_table
from pipeline.report.compare import GAIN_NOISE, SideBySide, gain_class, side_by_side
from pipeline.report.costs import CostTable, cost_table
from pipeline.report.table import ComparisonTable, Series, comparison_table, series_of

__all__ = ["FORMATS", "TABLES", "ReportSummary", "build_report", "format_table", "ComparisonTable",
           "Series", "comparison_table", "series_of", "GAIN_NOISE", "SideBySide", "gain_class",
           "side_by_side", "CostTable", "cost_table"]
