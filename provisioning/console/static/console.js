// devicegate console: live mode of the events page (EventSource). No inline script (CSP).
"use strict";

(function () {
  const MAX_ROWS = 1000;

  function when(iso) {
    // "2026-11-29T19:00:00.123456+00:00" -> "2026-11-29 19:00:00.123Z", as the server renders
    const d = new Date(iso);
    return d.toISOString().replace("T", " ");
  }

  // Labels as the server writes them (tables.COLUMNS): the phone layout shows them in cards.
  function cell(label, text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.dataset.label = label;
    td.textContent = text == null ? "" : String(text);
    return td;
  }

  function row(event) {
    const tr = document.createElement("tr");
    tr.dataset.id = event.id;
    tr.className = "fresh";
    tr.appendChild(cell("time (UTC)", when(event.time), "mono"));
    tr.appendChild(cell("type", event.type, "type"));
    const outcome = cell("outcome", "");
    const label = document.createElement("span");
    label.className = "outcome " + (event.outcome === "denied" ? "denied" : "allowed");
    label.textContent = String(event.outcome).toUpperCase();
    outcome.appendChild(label);
    tr.appendChild(outcome);
    tr.appendChild(cell("reason", event.reason, "reason"));
    const device = cell("device", "");
    if (event.device_id) {
      const a = document.createElement("a");
      a.href = "/console/devices/" + encodeURIComponent(event.device_id);
      a.textContent = event.device_id;
      device.appendChild(a);
    }
    tr.appendChild(device);
    const actor = event.detail && typeof event.detail.actor === "string" ? event.detail.actor : "";
    tr.appendChild(cell("actor", actor, "actor"));
    tr.appendChild(cell("client id", event.client_id));
    tr.appendChild(cell("peer", event.peer_address, "mono"));
    tr.appendChild(cell("certificate", event.certificate, "certificate")); // formatted by the server
    tr.appendChild(cell("instance", event.instance));
    tr.appendChild(cell("chain:seq", event.chain_id + ":" + event.seq, "mono"));
    const detail = event.detail && Object.keys(event.detail).length ? JSON.stringify(event.detail) : "";
    tr.appendChild(cell("detail", detail, "detail"));
    return tr;
  }

  // Phones: the filter form folds away (details/summary) unless it reports an error.
  function foldFilters() {
    const box = document.getElementById("filters-box");
    if (!box || box.querySelector("[aria-invalid]") || document.getElementById("filter-error")) return;
    if (window.matchMedia("(max-width: 640px)").matches) box.open = false;
  }

  function setupLive() {
    const button = document.getElementById("live-toggle");
    const status = document.getElementById("live-status");
    const body = document.querySelector("#events tbody");
    if (!button || !status || !body) return;
    let source = null;
    let received = 0;

    function stop() {
      if (source) source.close();
      source = null;
      button.textContent = "Start live mode";
      button.setAttribute("aria-pressed", "false");
      status.textContent = "Live mode is off.";
    }

    function start() {
      received = 0;
      source = new EventSource(button.dataset.src);
      button.textContent = "Stop live mode";
      button.setAttribute("aria-pressed", "true");
      status.textContent = "Live: connecting...";
      source.addEventListener("open", function () {
        status.textContent = "Live: connected, waiting for new events.";
      });
      source.addEventListener("auth", function (message) {
        const event = JSON.parse(message.data);
        if (body.querySelector('tr[data-id="' + CSS.escape(event.id) + '"]')) return;
        body.insertBefore(row(event), body.firstChild);
        while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
        received += 1;
        status.textContent = "Live: " + received + " new event" + (received === 1 ? "" : "s") + ".";
      });
      source.addEventListener("error", function () {
        status.textContent = "Live: connection lost, reconnecting...";
      });
    }

    button.addEventListener("click", function () {
      if (source) stop(); else start();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    foldFilters();
    setupLive();
  });
})();
