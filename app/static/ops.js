// The stock dashboard (/ops/): polls GET /api/ops/summary/ every second and draws it.
// Plain script, no framework, nothing from outside the service. Text from the service is only
// ever set as textContent, never parsed as HTML (a SKU is whatever an admin typed).
(function () {
  "use strict";

  var POLL_MS = 1000;          // the contract asks for at least every 2 s
  var TIMEOUT_MS = 5000;       // a poll that hangs longer is abandoned and retried
  var WINDOW_MS = 60000;       // the page keeps the last minute of its own polls for the rates
  var STALE_MS = 5000;         // data older than this is greyed out
  var KEY_STORE = "inventory.ops.api_key";

  var summaryUrl = document.body.getAttribute("data-summary-url");
  var pinned = new URLSearchParams(window.location.search).getAll("variant_id");
  var samples = [];            // {t, reservations, refusals}
  var rows = new Map();        // variant id -> its <tr>
  var timer = null;
  var lastOk = 0;
  var latest = 0;              // the newest poll: an older one still in flight is ignored when it ends

  function $(id) { return document.getElementById(id); }

  function setText(id, value) { $(id).textContent = value; }

  function storedKey() {
    try { return window.sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { return ""; }
  }

  function storeKey(key) {
    try {
      if (key) { window.sessionStorage.setItem(KEY_STORE, key); } else { window.sessionStorage.removeItem(KEY_STORE); }
    } catch (e) { /* storage off: the key then lives only as long as this page */ }
  }

  var memoryKey = storedKey();

  function status(text, kind) {
    var el = $("status");
    el.textContent = text;
    el.className = "status" + (kind ? " " + kind : "");
  }

  function askForKey(message) {
    clearTimeout(timer);
    $("dashboard").hidden = true;
    $("forget-key").hidden = true;
    $("key-message").textContent = message;
    $("key-form").hidden = false;
    status("Waiting for an admin key", "warn");
    $("key-form").elements.api_key.focus();
  }

  function summaryQuery() {
    var params = new URLSearchParams();
    pinned.forEach(function (id) { params.append("variant_id", id); });
    var query = params.toString();
    return query ? "?" + query : "";
  }

  function poll() {
    clearTimeout(timer);
    var mine = ++latest;
    var key = memoryKey;
    var headers = { "Accept": "application/json" };
    if (key) { headers.Authorization = "Bearer " + key; }
    var abort = new AbortController();
    var hang = setTimeout(function () { abort.abort(); }, TIMEOUT_MS);
    fetch(summaryUrl + summaryQuery(), { headers: headers, cache: "no-store", signal: abort.signal })
      .then(function (response) {
        return response.json().catch(function () { return null; }).then(function (body) {
          return { response: response, body: body };
        });
      })
      .then(function (result) {
        clearTimeout(hang);
        if (mine !== latest) { return; }
        var code = result.response.status;
        if (code === 401) {
          if (key) { memoryKey = ""; storeKey(""); }
          askForKey(key ? "That key is not known to the service. Enter an admin API key."
                        : "This page shows live stock to admins. Enter an admin API key; it stays in this tab only.");
          return;
        }
        if (code === 403) {
          memoryKey = ""; storeKey("");
          askForKey("That key is not an admin key. Enter an admin API key.");
          return;
        }
        if (!result.response.ok || !result.body) {
          var message = result.body && result.body.error ? result.body.error.message : "HTTP " + code;
          status("The summary failed: " + message + " (HTTP " + code + "); retrying", "bad");
        } else {
          lastOk = Date.now();
          draw(result.body);
          status("Live · updated " + clock(result.body.generated_at) + " · every second", "ok");
        }
        schedule();
      })
      .catch(function () {
        clearTimeout(hang);
        if (mine !== latest) { return; }
        status("Cannot reach the service; retrying", "bad");
        schedule();
      });
  }

  function schedule() {
    $("dashboard").classList.toggle("stale", lastOk > 0 && Date.now() - lastOk > STALE_MS);
    timer = setTimeout(poll, POLL_MS);
  }

  // --- drawing -----------------------------------------------------------------------------

  function number(value) {
    return value === null || value === undefined ? "–" : Number(value).toLocaleString("en");
  }

  function rate(value) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(1);
  }

  function clock(iso) {
    var when = iso ? new Date(iso) : new Date();
    return isNaN(when) ? String(iso) : when.toLocaleTimeString("en-GB");
  }

  function ago(iso, now) {
    if (!iso) { return null; }
    var seconds = Math.max(0, Math.round((now - new Date(iso)) / 1000));
    if (seconds < 120) { return seconds + " s ago"; }
    if (seconds < 7200) { return Math.round(seconds / 60) + " min ago"; }
    return Math.round(seconds / 3600) + " h ago";
  }

  function mark(id, kind) {
    var el = $(id);
    el.classList.remove("ok", "warn", "bad");
    if (kind) { el.classList.add(kind); }
  }

  function draw(s) {
    $("key-form").hidden = true;
    $("dashboard").hidden = false;
    $("forget-key").hidden = !memoryKey;
    var totals = s.totals || {};
    ["on_hand", "available", "reserved", "holds_live"].forEach(function (name) {
      setText("total-" + name, number(totals[name]));
    });
    setText("holds-lapsing", number(s.holds_lapsing_next_minute));
    drawRates(s);
    drawHealth(s);
    drawVariants(s.variants || []);
  }

  function drawRates(s) {
    var now = Date.now();
    samples.push({ t: now, reservations: Number(s.reservations_per_second) || 0,
                   refusals: Number(s.refusals_per_second) || 0 });
    while (samples.length && now - samples[0].t > WINDOW_MS) { samples.shift(); }
    ["reservations", "refusals"].forEach(function (name) {
      setText("rate-" + name, rate(s[name + "_per_second"]));
      var sum = samples.reduce(function (acc, sample) { return acc + sample[name]; }, 0);
      setText("avg-" + name, rate(sum / samples.length));
      spark($("spark-" + name), samples.map(function (sample) { return sample[name]; }), now);
    });
  }

  function spark(svg, values, now) {
    var top = Math.max.apply(null, values.concat([1]));
    var points = samples.map(function (sample, i) {
      var x = 120 - (now - sample.t) / WINDOW_MS * 120;
      var y = 29 - values[i] / top * 27;
      return x.toFixed(1) + "," + y.toFixed(1);
    }).join(" ");
    var line = svg.firstChild;
    if (!line) {
      line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      svg.appendChild(line);
    }
    line.setAttribute("points", points);
  }

  function drawHealth(s) {
    var now = s.generated_at ? new Date(s.generated_at) : new Date();
    var invariant = s.invariant || {};
    var violations = invariant.violations || [];
    setText("invariant-state", invariant.ok ? "holds" : "broken");
    setText("invariant-detail", invariant.ok ? "available + reserved = on hand"
      : violations.length + " variant(s): " + violations.slice(0, 20).join(", "));
    mark("invariant", invariant.ok ? "ok" : "bad");

    var jobs = s.jobs || {};
    var sweep = jobs.sweep || {};
    var sweepAge = ago(sweep.last_success_at, now);
    setText("sweep-age", sweepAge || "never");
    setText("sweep-detail", sweepAge ? "released " + number(sweep.released) + " lapsed hold(s)" : "no success yet");
    mark("job-sweep", sweepAge ? "ok" : "warn");
    var reconcile = jobs.reconcile || {};
    var reconcileAge = ago(reconcile.last_success_at, now);
    setText("reconcile-age", reconcileAge || "never");
    setText("reconcile-detail", reconcileAge
      ? "drifted " + number(reconcile.drifted) + ", repaired " + number(reconcile.repaired) : "no success yet");
    mark("job-reconcile", !reconcileAge ? "warn" : (reconcile.drifted ? "warn" : "ok"));

    var listener = s.listener || {};
    setText("listener-state", listener.alive ? "alive" : "down");
    setText("listener-detail", listener.lag_p99_ms === null || listener.lag_p99_ms === undefined
      ? "no release measured yet" : "release lag p99 " + number(Math.round(listener.lag_p99_ms)) + " ms");
    mark("listener", listener.alive ? "ok" : "bad");
  }

  function cell(row, field, numeric) {
    var td = document.createElement("td");
    td.setAttribute("data-field", field);
    if (numeric) { td.className = "n"; }
    row.appendChild(td);
    return td;
  }

  function makeRow(id) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-variant-id", id);
    var name = cell(tr, "variant_id", false);
    name.appendChild(document.createElement("span"));
    var tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = "pinned";
    name.appendChild(tag);
    cell(tr, "sku", false);
    ["on_hand", "available", "reserved", "active_holds", "reservations_per_minute"].forEach(function (field) {
      cell(tr, field, true);
    });
    var barCell = document.createElement("td");
    barCell.className = "bar-col";
    var bar = document.createElement("div");
    bar.className = "bar";
    ["available", "reserved"].forEach(function (part) {
      var span = document.createElement("span");
      span.className = part;
      bar.appendChild(span);
    });
    barCell.appendChild(bar);
    tr.appendChild(barCell);
    return tr;
  }

  function integer(value) {
    // the hooks promise plain integers: no thousands separators in these cells
    return value === null || value === undefined ? "" : String(Math.trunc(Number(value)));
  }

  function fill(tr, v, isPinned) {
    var field = function (name) { return tr.querySelector('[data-field="' + name + '"]'); };
    field("variant_id").firstChild.textContent = "#" + v.variant_id;
    tr.classList.toggle("pinned", isPinned);
    field("sku").textContent = v.sku === null || v.sku === undefined ? "" : v.sku;
    ["on_hand", "available", "reserved", "active_holds"].forEach(function (name) {
      field(name).textContent = integer(v[name]);
    });
    field("reservations_per_minute").textContent = number(v.reservations_per_minute);
    var available = Math.max(0, Number(v.available) || 0);
    var reserved = Math.max(0, Number(v.reserved) || 0);
    var whole = Math.max(Number(v.on_hand) || 0, available + reserved, 1);
    var bar = tr.querySelector(".bar");
    bar.children[0].style.width = (available / whole * 100).toFixed(2) + "%";
    bar.children[1].style.width = (reserved / whole * 100).toFixed(2) + "%";
    bar.title = available + " available, " + reserved + " reserved of " + v.on_hand + " on hand";
  }

  function drawVariants(variants) {
    var body = document.querySelector("#variants tbody");
    var pinnedSet = new Set(pinned.map(String));
    // pinned variants first, in the order asked for; then the busiest, as the service sorts them
    var ordered = variants.filter(function (v) { return pinnedSet.has(String(v.variant_id)); })
      .sort(function (a, b) { return pinned.indexOf(String(a.variant_id)) - pinned.indexOf(String(b.variant_id)); })
      .concat(variants.filter(function (v) { return !pinnedSet.has(String(v.variant_id)); }));
    var seen = new Set();
    ordered.forEach(function (v) {
      var id = String(v.variant_id);
      if (seen.has(id)) { return; }
      seen.add(id);
      var tr = rows.get(id);
      if (!tr) { tr = makeRow(id); rows.set(id, tr); }
      fill(tr, v, pinnedSet.has(id));
      body.appendChild(tr);  // appending an existing row moves it: the rows follow the new order
    });
    rows.forEach(function (tr, id) {
      if (!seen.has(id)) { tr.remove(); rows.delete(id); }
    });
    $("no-variants").hidden = seen.size > 0;
  }

  // --- start -------------------------------------------------------------------------------

  $("key-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var key = this.elements.api_key.value.trim();
    if (!key) { return; }
    memoryKey = key;
    storeKey(key);
    this.elements.api_key.value = "";
    $("key-form").hidden = true;
    status("Loading…", "");
    poll();
  });

  $("forget-key").addEventListener("click", function () {
    memoryKey = "";
    storeKey("");
    poll();  // with authentication on this asks for a key again
  });

  poll();
}());
