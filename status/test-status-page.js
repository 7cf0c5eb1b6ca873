#!/usr/bin/env node
/*
 * The browser half of t/81-status-page.t: Debian's chromium, driven by
 * playwright-core (status/package-lock.json), loads the status page of a
 * running nginx while the test's load runs, and checks it against the
 * metrics endpoint.  Prints one JSON object per check on stdout,
 *   {"ok": true|false, "name": "...", "diag": "..."}
 * and {"done": true, ...} at the end; t/81 turns them into TAP.
 *
 *   node status/test-status-page.js --base http://127.0.0.1:PORT
 *        --page /status --metrics /metrics?format=json
 *        --screenshot docs/status-page.png --profile DIR
 *        [--chromium /usr/bin/chromium] [--polls-for-screenshot 25]
 *
 * Numbers "for the same moment, within one poll": the metrics endpoint is
 * read (M0), then the page is left to finish two more polls (the second
 * one started after M0 was read), then its numbers are read from the DOM
 * at once, then the endpoint again (M1).  Every counter shown must be in
 * [M0, M1], and every number shown must be the one of the JSON the page
 * last polled.  Any page error, console error, failed request or request
 * to another origin is a failure.
 */

"use strict";

const http = require("http");
const { chromium } = require("playwright-core");

const arg = (name, dflt) => {
    const i = process.argv.indexOf("--" + name);
    return i > 0 ? process.argv[i + 1] : dflt;
};

const BASE = arg("base");
const PAGE = arg("page", "/status");
const METRICS = arg("metrics", "/metrics?format=json");
const SHOT = arg("screenshot");
const PROFILE = arg("profile");
const CHROMIUM = arg("chromium", "/usr/bin/chromium");
const SHOT_POLLS = parseInt(arg("polls-for-screenshot", "25"), 10);

let failures = 0;

function check(ok, name, diag) {
    if (!ok) { failures++; }
    process.stdout.write(JSON.stringify({ ok: !!ok, name: name,
                                          diag: ok ? undefined : diag })
                         + "\n");
    return ok;
}

function getJSON(path) {
    return new Promise((resolve, reject) => {
        const req = http.get(BASE + path, {
            headers: { Accept: "application/json" }, timeout: 15000
        }, (res) => {
            let body = "";
            res.setEncoding("utf8");
            res.on("data", (c) => { body += c; });
            res.on("end", () => {
                if (res.statusCode !== 200) {
                    reject(new Error(path + ": HTTP " + res.statusCode));
                    return;
                }
                try { resolve(JSON.parse(body)); } catch (e) { reject(e); }
            });
        });
        req.on("timeout", () => req.destroy(new Error(path + ": timeout")));
        req.on("error", reject);
    });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/* the counters and gauges of a metrics JSON, by the page's names */
function flatten(d) {
    const m = {};
    for (const z of d.zones || []) {
        m[`zone/${z.zone}/inflight_limit`] = z.inflight_limit;
        m[`zone/${z.zone}/keys`] = z.keys;
        let inflight = 0;
        for (const c of z.classes || []) {
            const q = c.requests || {};
            const k = `zone/${z.zone}/class/${c.class}/`;
            m[k + "admitted"] = q.admitted;
            m[k + "queued"] = q.queued;
            m[k + "rejected"] = q.rejected_429 + q.rejected_503
                                + q.rejected_other;
            m[k + "queue_depth"] = c.queue_depth;
            m[k + "queue_capacity"] = c.queue_capacity;
            m[k + "inflight"] = c.inflight;
            m[k + "retry_count"] = c.retry_after.count;
            m[k + "retry_last"] = c.retry_after.last_seconds;
            inflight += c.inflight;
        }
        m[`zone/${z.zone}/inflight`] = inflight;
    }
    for (const c of d.caches || []) {
        const q = c.requests;
        const k = `cache/${c.cache}/`;
        m[k + "served"] = q.hit + q.coalesced + q.stale;
        m[k + "lookups"] = q.hit + q.coalesced + q.stale + q.miss + q.expired;
        m[k + "entries"] = c.entries;
        m[k + "bytes"] = c.bytes;
        m[k + "capacity_bytes"] = c.capacity_bytes;
        m[k + "evictions"] = c.evictions;
        m[k + "store_failures"] = c.store_failures;
    }
    return m;
}

const COUNTERS = /\/(admitted|queued|rejected|served|lookups|evictions|store_failures)$/;

/* what the page shows: { key: text } with the page's own last JSON */
async function readPage(page) {
    return page.evaluate(() => {
        const S = window.dsgStatus;
        const shown = {};
        document.querySelectorAll("[data-m]").forEach((e) => {
            const d = e.dataset;
            const owner = d.cache !== undefined ? `cache/${d.cache}/`
                : `zone/${d.zone}/` + (d.class !== undefined
                                       ? `class/${d.class}/` : "");
            shown[owner + d.m] = e.textContent;
        });
        return { polls: S.polls, errors: S.errors, at: S.lastAt,
                 last: JSON.parse(JSON.stringify(S.last)), shown: shown };
    });
}

async function waitPolls(page, n, ms) {
    await page.waitForFunction((k) => window.dsgStatus
                                      && window.dsgStatus.polls >= k,
                               n, { timeout: ms, polling: 100 });
}

const polls = (page) => page.evaluate(() => window.dsgStatus.polls);

function parseBytes(s) {
    const m = /^([\d.]+) (B|KiB|MiB|GiB|TiB)$/.exec(s);
    if (!m) { return NaN; }
    const u = { B: 1, KiB: 1024, MiB: 1 << 20, GiB: 1 << 30, TiB: 2 ** 40 };
    return parseFloat(m[1]) * u[m[2]];
}

/* one "same moment" comparison; returns the problems found */
async function compareOnce(page) {
    const m0 = flatten(await getJSON(METRICS));
    const p0 = await polls(page);
    /* poll p0+1 may have started before M0 was read, p0+2 did not */
    await waitPolls(page, p0 + 2, 20000);
    const snap = await readPage(page);
    const m1 = flatten(await getJSON(METRICS));
    const last = flatten(snap.last);
    const bad = [];
    let compared = 0;

    for (const key of Object.keys(m0)) {
        if (/retry_count$/.test(key)) { continue; }
        let text = snap.shown[key];
        if (/retry_last$/.test(key)) {
            text = snap.shown[key.replace(/retry_last$/, "retry_after_last")];
            if (last[key.replace(/last$/, "count")] === 0) {
                if (text !== "–") { bad.push(`${key}: "${text}", no rejection yet`); }
                continue;
            }
            const want = last[key];
            if (Math.abs(parseFloat(text) - want) > 0.006 + want * 0.01) {
                bad.push(`${key}: shown ${text}, polled ${want}`);
            }
            compared++;
            continue;
        }
        if (text === undefined) {
            bad.push(`${key}: not on the page`);
            continue;
        }
        compared++;
        if (/bytes$/.test(key)) {
            const v = parseBytes(text), want = last[key];
            if (!(Math.abs(v - want) <= want * 0.06 + 1)) {
                bad.push(`${key}: shown "${text}", polled ${want}`);
            }
            continue;
        }
        let v = parseInt(text, 10);
        if ((text === "none" || text === "no cap")
            && /(queue_capacity|inflight_limit)$/.test(key)) {
            v = 0;
        }
        if (String(v) !== text && v !== 0) {
            bad.push(`${key}: "${text}" is not a number`);
            continue;
        }
        if (v !== last[key]) {
            bad.push(`${key}: shown ${v}, the page's last poll has ${last[key]}`);
        }
        if (COUNTERS.test(key) && !(m0[key] <= v && v <= m1[key])) {
            bad.push(`${key}: shown ${v}, not within /metrics before and after: [${m0[key]}, ${m1[key]}]`);
        }
        if (/(queue_capacity|inflight_limit)$/.test(key)
            && !(v === m0[key] && v === m1[key])) {
            bad.push(`${key}: shown ${v}, /metrics ${m0[key]}`);
        }
        if (/entries$/.test(key)
            && !(Math.min(m0[key], m1[key]) <= v
                 && v <= Math.max(m0[key], m1[key]))) {
            bad.push(`${key}: shown ${v}, /metrics [${m0[key]}, ${m1[key]}]`);
        }
    }
    /* gauges against their caps */
    for (const key of Object.keys(m0)) {
        const mm = /^(zone\/[^/]+\/)(?:class\/[^/]+\/)?(inflight|queue_depth)$/
                   .exec(key);
        if (!mm) { continue; }
        const v = parseInt(snap.shown[key], 10);
        const cap = mm[2] === "inflight" ? m0[mm[1] + "inflight_limit"]
                                         : m0[key.replace(/depth$/, "capacity")];
        if (cap > 0 && !(v >= 0 && v <= cap)) {
            bad.push(`${key}: ${v} outside [0, ${cap}]`);
        }
    }
    return { bad, compared, snap, m0, m1 };
}

async function main() {
    const errors = [];
    const foreign = [];
    const failed = [];
    let requests = 0;

    const watchdog = setTimeout(() => {
        check(false, "the browser test finishes in 240 s", "watchdog");
        process.exit(1);
    }, 240000);

    const ctx = await chromium.launchPersistentContext(PROFILE, {
        executablePath: CHROMIUM,
        headless: true,
        args: ["--headless", "--no-sandbox", "--disable-gpu",
               "--disable-quic", "--no-first-run",
               "--disable-background-networking",
               "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage"],
        viewport: { width: 1440, height: 1000 },
        deviceScaleFactor: 1,
        timeout: 60000
    });
    const page = ctx.pages()[0] || await ctx.newPage();
    page.setDefaultTimeout(30000);

    page.on("pageerror", (e) => errors.push("pageerror: " + (e.stack || e)));
    page.on("console", (msg) => {
        if (msg.type() === "error" || msg.type() === "assert") {
            errors.push(`console.${msg.type()}: ${msg.text()}`);
        }
    });
    page.on("request", (r) => {
        requests++;
        if (!r.url().startsWith(BASE + "/")) { foreign.push(r.url()); }
    });
    page.on("requestfailed", (r) => {
        failed.push(`${r.url()}: ${r.failure() && r.failure().errorText}`);
    });

    const resp = await page.goto(BASE + PAGE, { waitUntil: "load",
                                                timeout: 60000 });
    check(resp && resp.status() === 200, "the page loads: 200",
          resp ? resp.status() : "no response");
    const h = resp ? await resp.allHeaders() : {};
    check(/^text\/html; charset=utf-8$/i.test(h["content-type"] || ""),
          "Content-Type: text/html; charset=utf-8", h["content-type"]);

    await waitPolls(page, 3, 60000);
    check(true, "the page polled 3 times");

    const title = await page.title();
    check(/deepseek guard/.test(title), "title", title);

    /* the layout: every zone, class and cache of the JSON */
    {
        const d = await getJSON(METRICS);
        const want = [];
        for (const z of d.zones) {
            want.push(`zone/${z.zone}/inflight`);
            for (const c of z.classes) {
                want.push(`zone/${z.zone}/class/${c.class}/admitted_rate`);
            }
        }
        for (const c of d.caches) { want.push(`cache/${c.cache}/hit_ratio`); }
        const snap = await readPage(page);
        const missing = want.filter((k) => !(k in snap.shown));
        check(missing.length === 0 && want.length >= 4,
              `every zone, class and cache is on the page (${want.length} rows)`,
              "missing: " + missing.join(", "));
    }

    /* the same numbers as /metrics, three times, moments apart */
    for (let i = 1; i <= 3; i++) {
        const r = await compareOnce(page);
        check(r.bad.length === 0 && r.compared >= 20,
              `moment ${i}: the ${r.compared} numbers shown match /metrics `
              + "within one poll",
              r.bad.slice(0, 20).join("\n"));
    }

    /* the rates: what the page showed poll after poll against the rate
     * of the /metrics counters over the same time */
    {
        const d0 = await getJSON(METRICS), t0 = Date.now();
        const m0 = flatten(d0);
        const first = await polls(page);
        const charts0 = await page.evaluate(() => window.dsgStatus.charts
            .map((u) => ({ title: u.dsgTitle, n: u.data[0].length,
                           png: u.ctx.canvas.toDataURL() })));
        const samples = [];
        let p = first;
        const want = 8;
        while (samples.length < want) {
            await waitPolls(page, p + 1, 20000);
            const s = await readPage(page);
            p = s.polls;
            samples.push(s.shown);
        }
        const m1 = flatten(await getJSON(METRICS)), t1 = Date.now();
        const secs = (t1 - t0) / 1000;
        const bad = [];
        let moving = { admitted: 0, queued: 0, rejected: 0 };
        for (const key of Object.keys(m0)) {
            const mm = /^(zone\/[^/]+\/class\/[^/]+\/)(admitted|queued|rejected)$/
                       .exec(key);
            if (!mm) { continue; }
            const real = (m1[key] - m0[key]) / secs;
            const shown = samples.map((s) => parseFloat(s[key + "_rate"]))
                                 .filter((v) => isFinite(v));
            const mean = shown.reduce((a, b) => a + b, 0)
                         / Math.max(1, shown.length);
            if (shown.length < want - 1
                || Math.abs(mean - real) > 0.5 * real + 1.5) {
                bad.push(`${key}/s: page ${mean.toFixed(2)} (${shown.join(" ")}), `
                         + `/metrics ${real.toFixed(2)} over ${secs.toFixed(1)} s`);
            }
            if (real > 0.5) { moving[mm[2]]++; }
        }
        check(bad.length === 0, "the rates shown agree with the counters "
              + "(mean of 8 polls within 50% + 1.5/s)", bad.join("\n"));
        check(moving.admitted > 0 && moving.queued > 0 && moving.rejected > 0,
              "the load moves admitted, queued and rejected",
              JSON.stringify(moving));

        /* cache: hit ratio shown within the window */
        const ratios = samples.map((s) => Object.keys(s)
            .filter((k) => /^cache\/[^/]+\/hit_ratio$/.test(k))
            .map((k) => parseFloat(s[k]))).flat().filter(isFinite);
        check(ratios.length >= want - 1
              && ratios.every((r) => r > 0 && r < 100),
              "the cache hit ratio is shown, between 0 and 100 %",
              ratios.join(" "));

        /* Retry-After: shown for the classes that were rejected */
        const retry = samples.map((s) => Object.keys(s)
            .filter((k) => /\/retry_after_mean$/.test(k))
            .map((k) => parseFloat(s[k]))).flat().filter(isFinite);
        check(retry.length > 0 && retry.every((v) => v > 0 && v < 120),
              "Retry-After levels are shown (seconds, > 0)",
              retry.join(" "));

        const charts1 = await page.evaluate(() => window.dsgStatus.charts
            .map((u) => ({ title: u.dsgTitle, n: u.data[0].length,
                           png: u.ctx.canvas.toDataURL() })));
        const grew = charts1.filter((c, i) => charts0[i]
                                    && c.n >= charts0[i].n + want - 2);
        check(charts1.length === charts0.length && charts1.length >= 5
              && grew.length === charts1.length,
              `the ${charts1.length} charts got ${want} more points`,
              charts1.map((c, i) => `${c.title}: ${charts0[i] && charts0[i].n}`
                                    + ` -> ${c.n}`).join("\n"));
        const redrawn = charts1.filter((c, i) => charts0[i]
                                       && c.png !== charts0[i].png);
        const rates = charts1.map((c, i) => [c, charts0[i]])
            .filter((x) => x[0].title === "requests / s");
        check(rates.length > 0 && rates.every((x) => x[0].png !== x[1].png),
              `the charts are redrawn (${redrawn.length} of ${charts1.length}`
              + " changed, every requests / s chart)",
              rates.map((x) => x[0].title).join(" "));
    }

    /* a screenshot with some history in the charts */
    await waitPolls(page, SHOT_POLLS, 120000);
    if (SHOT) {
        await page.screenshot({ path: SHOT, fullPage: true });
        check(true, "screenshot saved to " + SHOT);
    }

    const end = await page.evaluate(() => ({ polls: window.dsgStatus.polls,
                                             errors: window.dsgStatus.errors,
                                             state: document.getElementById(
                                                 "state").textContent }));
    check(end.errors === 0 && end.state === "live",
          `every poll succeeded (${end.polls})`, JSON.stringify(end));
    check(errors.length === 0, "no JavaScript error, no console error",
          errors.join("\n"));
    check(failed.length === 0, "no failed request", failed.join("\n"));
    check(foreign.length === 0 && requests > 5,
          `no request to another origin (${requests} requests)`,
          foreign.join("\n"));

    await ctx.close();
    clearTimeout(watchdog);
    process.stdout.write(JSON.stringify({ done: true, failures: failures,
                                          polls: end.polls }) + "\n");
}

main().catch((e) => {
    check(false, "the browser test ran to its end", String(e && e.stack || e));
    process.exit(1);
});
