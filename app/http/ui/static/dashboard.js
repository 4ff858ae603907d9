// The dashboard's one script (no build step, no inline script: the page's CSP allows
// scripts from this origin only). It refreshes the overview's figures every 2 s
// without reloading the page, and draws the last hour's charts with uPlot (vendored
// under vendor/uplot). Every other page works without it: forms post, links link.
(function () {
  "use strict";

  // Run fn now-ish and then every `every` ms, one call at a time, skipping while the
  // tab is hidden (nobody looks: no reason to ask Redis).
  function every(ms, fn) {
    async function tick() {
      try {
        if (!document.hidden) await fn();
      } finally {
        setTimeout(tick, ms);
      }
    }
    setTimeout(tick, ms);
  }

  async function fetchOk(url, accept) {
    const reply = await fetch(url, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: accept },
    });
    if (reply.status === 401) {
      window.location.reload(); // the session ended: the page goes to the login form
      throw new Error("logged out");
    }
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    return reply;
  }

  // The figures, leader and workers: HTML rendered (and escaped) by the server.
  const live = document.getElementById("live");
  const status = document.getElementById("live-status");
  if (live) {
    every(Number(live.dataset.every) || 2000, async function () {
      try {
        const reply = await fetchOk(live.dataset.src, "text/html");
        live.innerHTML = await reply.text();
        status.textContent = "live";
        status.classList.remove("stale");
      } catch (err) {
        status.textContent = "stale";
        status.classList.add("stale");
      }
    });
  }

  const charts = document.getElementById("charts");
  if (charts && window.uPlot) {
    const utc = (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC");
    const hhmm = (ts) => new Date(ts * 1000).toISOString().slice(11, 16);
    const width = () => Math.max(320, charts.clientWidth - 16);
    // Lateness has gaps (minutes nothing ran): points show a minute alone.
    const line = (label, stroke, dash, points) => ({
      label, stroke, width: 2, dash, points: { show: Boolean(points), size: 5 },
    });
    const options = (series, unit) => ({
      width: width(),
      height: 220,
      tzDate: utc,
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      axes: [{ values: (u, splits) => splits.map(hhmm) }, { label: unit, size: 60 }],
      series: [{ label: "minute (UTC)", value: (u, ts) => (ts == null ? "--" : hhmm(ts)) }].concat(series),
    });
    const countSeries = [
      line("accepted", "#1f618d"),
      line("delivered", "#239b56"),
      line("failed", "#d68910"),
      line("dead", "#c0392b"),
    ];
    const lateSeries = [line("p50", "#1f618d", null, true), line("p99", "#c0392b", [6, 4], true)];
    let counts = null;
    let lateness = null;

    async function draw() {
      const reply = await fetchOk(charts.dataset.src, "application/json");
      const d = await reply.json();
      const countData = [d.t, d.accepted, d.delivered, d.failed, d.dead];
      const lateData = [d.t, d.p50, d.p99];
      if (counts === null) {
        counts = new uPlot(options(countSeries, "messages"), countData, document.getElementById("chart-counts"));
        lateness = new uPlot(options(lateSeries, "ms"), lateData, document.getElementById("chart-lateness"));
        charts.dataset.drawn = "true";
      } else {
        counts.setData(countData);
        lateness.setData(lateData);
      }
    }

    draw().catch(() => {});
    every(Number(charts.dataset.every) || 10000, () => draw().catch(() => {}));
    window.addEventListener("resize", function () {
      if (counts === null) return;
      counts.setSize({ width: width(), height: 220 });
      lateness.setSize({ width: width(), height: 220 });
    });
  }
})();
