"""The report's inline stylesheet and script.

Kept inline (and free of any URL) so the HTML file opens offline, from a CI artifact or
an e-mail attachment, exactly as it was written.
"""

CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d1d1f; background: #fafafa; }
header, main { max-width: 1680px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 18px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 8px; }
nav a { margin-right: 14px; color: #0b61a4; text-decoration: none; }
.meta { color: #666; margin: 0 0 8px; }
.na { color: #888; font-style: italic; }
.notes li { color: #8a4b00; }
.table-wrap { overflow-x: auto; background: #fff; border: 1px solid #ddd; width: fit-content; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
#comparison-table td, #provenance-table td { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; background: #f3f3f3;
                    position: sticky; top: 0; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; }
tr.baseline td { background: #f6f6f6; }
tr.avg td { font-weight: 600; }
td.best { color: #137333; font-weight: 700; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: 6px; flex: 0 1 auto;
         box-sizing: border-box; max-width: 100%; }
figure.missing { width: 280px; }
figure svg { display: block; max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 12px; max-width: 560px; overflow-wrap: anywhere; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg text.t { font-weight: 600; font-size: 12px; }
svg .frame { fill: none; stroke: #bbb; }
svg .grid { stroke: #eee; }
svg .axis { stroke: #888; }
details { background: #fff; border: 1px solid #ddd; margin: 6px 0; padding: 4px 8px; }
details details { margin-left: 12px; }
summary { cursor: pointer; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font-size: 12px; }
"""

# Sorts any <table class="sortable"> by the clicked header. Each cell carries its raw
# value in data-v (numbers unformatted, "" when not measured); empty values sort last.
JS = """
(function () {
  "use strict";
  function compareValues(x, y) {
    var nx = Number(x), ny = Number(y);
    if (x !== "" && y !== "" && !isNaN(nx) && !isNaN(ny)) { return nx - ny; }
    return x.localeCompare(y, undefined, { numeric: true });
  }
  function sortTable(table, column, header) {
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) {
      cell.removeAttribute("aria-sort");
    });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].getAttribute("data-v") || "";
      var y = b.cells[column].getAttribute("data-v") || "";
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var order = compareValues(x, y);
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, column) {
      header.tabIndex = 0;
      header.addEventListener("click", function () { sortTable(table, column, header); });
      header.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          sortTable(table, column, header);
        }
      });
    });
  });
})();
"""
