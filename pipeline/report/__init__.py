"""Reports of results folders: the accuracy table (console, markdown, csv, html), PNG plots
and a self-contained index.html. Entry point: `build_report`."""

from pipeline.report.build import FORMATS, ReportSummary, build_report, format_table
from pipeline.report.table import ComparisonTable, Series, comparison_table, series_of

__all__ = ["FORMATS", "ReportSummary", "build_report", "format_table", "ComparisonTable",
           "Series", "comparison_table", "series_of"]
