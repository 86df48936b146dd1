// Live progress on the jobs page: poll the staff-only JSON view every 2 s and update the rows.
// Text goes in with textContent (never innerHTML): messages and errors are untrusted.
(function () {
  "use strict";
  const table = document.getElementById("jobs");
  if (!table) return;
  const url = table.dataset.statusUrl;
  const INTERVAL_MS = 2000;

  function shownKeys() {
    return Array.from(table.querySelectorAll("tr[data-job-key]")).map(function (row) { return row.dataset.jobKey; });
  }

  function update(job) {
    const row = table.querySelector('tr[data-job-key="' + CSS.escape(job.key) + '"]');
    if (!row) return false;
    const field = function (name) { return row.querySelector('[data-field="' + name + '"]'); };
    field("status").textContent = job.status_display;
    field("status").className = "badge " + job.status;
    field("progress").value = job.progress;
    field("percent").textContent = Math.round(job.progress * 100) + "%";
    field("message").textContent = job.message;
    field("error").textContent = job.error.length > 500 ? job.error.slice(0, 499) + "…" : job.error;
    return true;
  }

  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (!response.ok) return;  // logged out or lost the role: stop updating, the page says what it showed
      const data = await response.json();
      const known = new Set(shownKeys());
      if (data.jobs.some(function (job) { return !known.has(job.key); })) {
        window.location.reload();  // a new job started: redraw the table
        return;
      }
      data.jobs.forEach(update);
    } catch (error) {
      // The server restarted or the network blinked: try again on the next tick.
    }
    setTimeout(poll, INTERVAL_MS);
  }
  setTimeout(poll, INTERVAL_MS);
})();
