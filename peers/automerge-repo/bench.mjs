// The side-by-side peer benchmark of issue 5 (deliverable 4): one load generator that drives the
// same record workload through an automerge-repo sync setup (a sync server with a websocket
// adapter and NodeFS storage, and client repos) and through real Concord nodes (the release
// binary, two nodes replicating over QUIC), then prints each figure for both and the ratio.
//
//   node bench.mjs [--seconds 20] [--warmup 3] [--clients 64] [--rates 50,1000]
//                  [--latency-seconds 10] [--latency-records 200] [--json PATH]
//                  [--only concord|automerge-repo] [--order concord-first] [--concord PATH] [--keep]
//
// `scripts/peer-bench` installs the packages, builds Concord and runs this. The same file, run
// with `--serve-automerge-repo DIRECTORY`, is the automerge-repo sync server (a child process),
// and in a worker thread it is client B of the latency phase.
// RESULTS.md beside it describes the method and the measured figures.

import { execFileSync, fork, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync, readdirSync, statSync } from "node:fs";
import { once } from "node:events";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { setTimeout as sleep } from "node:timers/promises";

import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter, WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket";
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs";
import { Pool } from "undici";
import { WebSocketServer } from "ws";

const here = path.dirname(fileURLToPath(import.meta.url));
const repository = path.resolve(here, "../..");

const { values: options } = parseArgs({
    options: {
        seconds: { type: "string", default: "20" },
        warmup: { type: "string", default: "3" },
        clients: { type: "string", default: "64" },
        rates: { type: "string", default: "50,1000" },
        "latency-seconds": { type: "string", default: "10" },
        "latency-records": { type: "string", default: "200" },
        json: { type: "string" },
        only: { type: "string" },
        order: { type: "string", default: "automerge-repo-first" },
        concord: { type: "string", default: path.join(repository, "target/release/concord") },
        keep: { type: "boolean", default: false },
        "serve-automerge-repo": { type: "string" },
    },
});

/** How long one write may wait for its acknowledgement before it counts as failed. */
const ACKNOWLEDGEMENT_TIMEOUT_MS = 30_000;
/** How long the latency phase waits for the last probes to show up on the reader. */
const LATENCY_DRAIN_MS = 30_000;
/** How long to wait for a Concord replica to catch up, or for automerge-repo's storage to flush. */
const CATCH_UP_TIMEOUT_MS = 180_000;

/** Prints a line of this program's own output. */
const say = console.log.bind(console);

/**
 * What the libraries print with console.log (automerge-repo reports some failures only that
 * way), counted by text instead of flooding the output; the report lists them.
 */
const libraryMessages = new Map();
console.log = (...parts) => {
    const text = parts.map(String).join(" ").slice(0, 300);
    libraryMessages.set(text, (libraryMessages.get(text) ?? 0) + 1);
};

const NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Niklaus"];
const CITIES = ["London", "Paris", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Seoul"];
const TIERS = ["bronze", "silver", "gold"];

// ---------------------------------------------------------------------------------------------
// The workload, shared by both systems.

/** A small deterministic random generator (mulberry32), so both systems see the same choices. */
function randomGenerator(seed) {
    let state = seed >>> 0;
    return () => {
        state = (state + 0x6d2b79f5) >>> 0;
        let mixed = Math.imul(state ^ (state >>> 15), 1 | state);
        mixed = (mixed + Math.imul(mixed ^ (mixed >>> 7), 61 | mixed)) ^ mixed;
        return ((mixed ^ (mixed >>> 14)) >>> 0) / 4294967296;
    };
}

/**
 * The operations of one client, in order: three creations of a new 4-field record, then one
 * patch of the `visits` field of a record this client created earlier (chosen at random).
 */
function* clientOperations(client) {
    const random = randomGenerator(client + 1);
    let created = 0;
    for (let index = 0; ; index += 1) {
        if (index % 4 === 3) {
            yield { kind: "patch", target: Math.floor(random() * created), visits: index };
        } else {
            const pick = (list) => list[Math.floor(random() * list.length)];
            const record = { name: pick(NAMES), city: pick(CITIES), tier: pick(TIERS), visits: 0 };
            yield { kind: "create", record, number: created };
            created += 1;
        }
    }
}

/**
 * Runs one closed loop per client for warmup + seconds: each client's `write(operation)` resolves
 * once the write is acknowledged (or rejects), and the client then issues its next operation.
 * Counts the writes acknowledged inside the measured window (after the warm-up), and the CPU the
 * named `processes` (role: pid) used in that window.
 */
async function closedLoop(connectedClients, settings, processes, writerRole) {
    const started = performance.now();
    const windowStart = started + settings.warmup * 1000;
    const windowEnd = windowStart + settings.seconds * 1000;
    let meter = null;
    let cpu = null;
    const windowTimers = [
        setTimeout(() => {
            meter = cpuMeter(processes);
        }, settings.warmup * 1000),
        setTimeout(() => {
            cpu = meter?.();
        }, (settings.warmup + settings.seconds) * 1000),
    ];
    const acknowledgedLatencies = [];
    let acknowledged = 0;
    let creations = 0;
    let patches = 0;
    let createdTotal = 0;
    let failed = 0;
    const failures = new Map();
    const loop = async (client, index) => {
        const operations = clientOperations(index);
        while (performance.now() < windowEnd) {
            const operation = operations.next().value;
            const issued = performance.now();
            try {
                await client.write(operation);
            } catch (error) {
                failed += 1;
                const message = String(error?.message ?? error).slice(0, 200);
                failures.set(message, (failures.get(message) ?? 0) + 1);
                continue;
            }
            const now = performance.now();
            if (operation.kind === "create") createdTotal += 1;
            if (now >= windowStart && now < windowEnd) {
                acknowledged += 1;
                if (operation.kind === "create") creations += 1;
                else patches += 1;
                acknowledgedLatencies.push(now - issued);
            }
        }
    };
    await Promise.all(connectedClients.map(loop));
    const drained = performance.now();
    windowTimers.forEach(clearTimeout);
    cpu ??= meter?.();
    acknowledgedLatencies.sort((left, right) => left - right);
    return {
        writes_per_second: acknowledged / settings.seconds,
        acknowledged,
        creations,
        patches,
        created_total: createdTotal,
        failed,
        failures: Object.fromEntries(failures),
        acknowledgement_ms: summary(acknowledgedLatencies),
        drain_seconds: (drained - windowEnd) / 1000,
        processes: cpu,
        cpu_ms_per_write: cpuPerWrite(cpu, acknowledged, writerRole),
    };
}

/**
 * Patches `records` round-robin at `rate` per second for `seconds`, each write due at a fixed
 * scheduled time, setting `visits` to `base` plus the probe's number. `write(record, visits)`
 * makes the write at A and resolves on its acknowledgement; the caller calls
 * `seen(record, visits, when)` as B observes values. Latency is from the scheduled time to the
 * moment B saw it, so a write that queued behind others counts in full (no coordinated omission).
 */
function pacedProbes(records, rate, seconds, base) {
    const probesByRecord = new Map(records.map((record) => [record, []]));
    const all = [];
    let seenCount = 0;
    let resolveAllSeen;
    const allSeen = new Promise((resolve) => {
        resolveAllSeen = resolve;
    });
    const total = rate * seconds;
    const seen = (record, visits, when) => {
        const pending = probesByRecord.get(record);
        if (!pending) return;
        while (pending.length > 0 && pending[0].visits <= visits) {
            const probe = pending.shift();
            probe.seen = when;
            seenCount += 1;
        }
        if (seenCount === total) resolveAllSeen();
    };
    const run = async (write) => {
        const started = performance.now();
        let issued = 0;
        const writes = [];
        while (issued < total) {
            // Probe i is due at i / rate seconds: when that time has come, i + 1 probes are due.
            const due = Math.min(total, Math.floor(((performance.now() - started) / 1000) * rate) + 1);
            for (; issued < due; issued += 1) {
                const record = records[issued % records.length];
                const visits = base + issued;
                const probe = { visits, scheduled: started + (issued * 1000) / rate, acknowledged: null, seen: null };
                probesByRecord.get(record).push(probe);
                all.push(probe);
                writes.push(
                    write(record, visits).then(
                        () => {
                            probe.acknowledged = performance.now();
                        },
                        () => {},
                    ),
                );
            }
            await sleep(1);
        }
        const offeredSeconds = (performance.now() - started) / 1000;
        await Promise.all(writes);
        const acknowledgedSeconds = (performance.now() - started) / 1000;
        await Promise.race([allSeen, sleep(LATENCY_DRAIN_MS)]);
        const replication = [];
        const acknowledgement = [];
        const afterAcknowledgement = [];
        let acknowledged = 0;
        for (const probe of all) {
            if (probe.acknowledged !== null) {
                acknowledged += 1;
                acknowledgement.push(probe.acknowledged - probe.scheduled);
            }
            if (probe.seen !== null) {
                replication.push(probe.seen - probe.scheduled);
                if (probe.acknowledged !== null) afterAcknowledgement.push(Math.max(0, probe.seen - probe.acknowledged));
            }
        }
        for (const list of [replication, acknowledgement, afterAcknowledgement]) list.sort((left, right) => left - right);
        return {
            offered: total,
            offered_rate: rate,
            offered_seconds: offeredSeconds,
            acknowledged,
            acknowledged_rate: acknowledged / acknowledgedSeconds,
            seen: replication.length,
            replication_ms: summary(replication),
            acknowledgement_ms: summary(acknowledgement),
            acknowledged_to_seen_ms: summary(afterAcknowledgement),
        };
    };
    return { seen, run };
}

/** p50, p99 and max of a sorted list (nearest rank), or nulls when it is empty. */
/** One line about a latency run, for the progress log. */
function latencyLine(measured) {
    const figure = (value) => (value === null ? "–" : value.toFixed(1));
    return (
        `${measured.acknowledged} of ${measured.offered} acknowledged (${measured.acknowledged_rate.toFixed(0)}/s), ` +
        `${measured.seen} seen on the reader; p50 ${figure(measured.replication_ms.p50)} ms, ` +
        `p99 ${figure(measured.replication_ms.p99)} ms, max ${figure(measured.replication_ms.max)} ms`
    );
}

function summary(sorted) {
    const rank = (fraction) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(fraction * sorted.length) - 1))];
    if (sorted.length === 0) return { count: 0, p50: null, p99: null, max: null };
    return { count: sorted.length, p50: rank(0.5), p99: rank(0.99), max: sorted[sorted.length - 1] };
}

// ---------------------------------------------------------------------------------------------
// Processes: CPU seconds and memory, to show which side of each setup was saturated.

const clockTicks = Number(execFileSync("getconf", ["CLK_TCK"]).toString().trim()) || 100;

function cpuSeconds(pid) {
    if (pid === process.pid) {
        const usage = process.cpuUsage();
        return (usage.user + usage.system) / 1e6;
    }
    try {
        const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
        const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
        return (Number(fields[11]) + Number(fields[12])) / clockTicks;
    } catch {
        return null;
    }
}

function residentMegabytes(pid) {
    try {
        const line = readFileSync(`/proc/${pid}/status`, "utf8")
            .split("\n")
            .find((text) => text.startsWith("VmRSS:"));
        return Number(line.split(/\s+/)[1]) / 1024;
    } catch {
        return null;
    }
}

/** Starts measuring CPU of the named processes; `stop()` gives CPU use as a share of one core. */
function cpuMeter(processes) {
    const started = performance.now();
    const before = Object.fromEntries(Object.entries(processes).map(([name, pid]) => [name, cpuSeconds(pid)]));
    return () => {
        const wall = (performance.now() - started) / 1000;
        const result = {};
        for (const [name, pid] of Object.entries(processes)) {
            const after = cpuSeconds(pid);
            const used = after === null || before[name] === null ? null : after - before[name];
            result[name] = {
                cpu_seconds: used,
                cores: used === null ? null : used / wall,
                rss_mb: residentMegabytes(pid),
            };
        }
        return result;
    };
}

/**
 * CPU milliseconds per acknowledged write in the window: for the server that took the writes
 * (`writerRole`), for the server side (every process but the load generator) and for all
 * processes. Less sensitive to other work on the machine than the rates are.
 */
function cpuPerWrite(cpu, acknowledged, writerRole) {
    if (!cpu || acknowledged === 0) return null;
    const milliseconds = (roles) => (roles.reduce((sum, [, usage]) => sum + (usage.cpu_seconds ?? 0), 0) * 1000) / acknowledged;
    const roles = Object.entries(cpu);
    return {
        writer: milliseconds(roles.filter(([role]) => role === writerRole)),
        servers: milliseconds(roles.filter(([role]) => role !== "load_generator")),
        all: milliseconds(roles),
    };
}

function directoryBytes(directory) {
    let total = 0;
    if (!existsSync(directory)) return 0;
    for (const entry of readdirSync(directory, { withFileTypes: true })) {
        const full = path.join(directory, entry.name);
        if (entry.isDirectory()) total += directoryBytes(full);
        else if (entry.isFile()) total += statSync(full).size;
    }
    return total;
}

// ---------------------------------------------------------------------------------------------
// automerge-repo.

/** The sync server: a Repo with the websocket server adapter and NodeFS storage (child process). */
async function serveAutomergeRepo(directory) {
    const sockets = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await once(sockets, "listening");
    // A server shares only what a client asks for by id, as automerge-repo's own sync server does.
    const repo = new Repo({
        network: [new WebSocketServerAdapter(sockets)],
        storage: new NodeFSStorageAdapter(directory),
        peerId: `sync-server-${process.pid}`,
        sharePolicy: async () => false,
    });
    let saves = 0;
    repo.on("doc-metrics", (event) => {
        if (event.type === "doc-saved") saves += 1;
    });
    process.on("message", async (message) => {
        if (message.type === "flush") {
            const started = performance.now();
            await repo.flush();
            process.send({
                type: "flushed",
                milliseconds: performance.now() - started,
                documents: Object.keys(repo.handles).length,
                saves,
            });
        } else if (message.type === "stop") {
            sockets.close();
            process.exit(0);
        }
    });
    process.send({ type: "listening", port: sockets.address().port });
}

/**
 * Follows a document that only this client writes, so its history is one chain of changes, and
 * tells which of them the sync server holds: the server's heads (from the sync state, announced
 * by the handle's "remote-heads" event) name a change of the chain, and every change up to it is
 * held. `changed()` is called after each local change (the creation included) and resolves once
 * the server holds that change.
 */
function serverTracker(handle, storageId) {
    const positions = new Map();
    const waiters = [];
    let latest = 0;
    let held = 0;
    handle.on("remote-heads", (event) => {
        if (event.storageId !== storageId) return;
        const position = Math.max(0, ...event.heads.map((head) => positions.get(head) ?? 0));
        if (position <= held) return;
        held = position;
        while (waiters.length > 0 && waiters[0].position <= held) {
            const waiter = waiters.shift();
            clearTimeout(waiter.timer);
            waiter.resolve();
        }
    });
    return {
        changed() {
            latest += 1;
            for (const head of handle.heads()) positions.set(head, latest);
            const position = latest;
            return new Promise((resolve, reject) => {
                const timer = setTimeout(() => {
                    const index = waiters.findIndex((waiter) => waiter.position === position);
                    if (index >= 0) waiters.splice(index, 1);
                    reject(new Error(`the sync server did not report the change within ${ACKNOWLEDGEMENT_TIMEOUT_MS} ms`));
                }, ACKNOWLEDGEMENT_TIMEOUT_MS);
                waiters.push({ position, resolve, timer });
            });
        },
    };
}

/**
 * Client B of the latency phase, in a worker thread: finds every document by URL through the
 * sync server, then posts each `visits` value it sees, stamped with `performance.timeOrigin +
 * performance.now()` (the same clock in every thread).
 */
async function automergeReader({ url, documents }) {
    console.log = (...parts) => parentPort.postMessage({ type: "log", text: parts.map(String).join(" ").slice(0, 300) });
    const client = await automergeClient(url);
    const repo = client.repo;
    repo.networkSubsystem.on("peer-disconnected", () => parentPort.postMessage({ type: "disconnected" }));
    for (let start = 0; start < documents.length; start += 64) {
        const handles = await Promise.all(documents.slice(start, start + 64).map((document) => repo.find(document)));
        for (const handle of handles) {
            const documentId = handle.documentId;
            handle.on("change", ({ doc }) => {
                parentPort.postMessage({ type: "seen", documentId, visits: doc.visits, when: performance.timeOrigin + performance.now() });
            });
        }
    }
    parentPort.postMessage({ type: "ready" });
}

/** A client repo (no storage, like a browser tab) connected to the server; resolves when joined. */
async function automergeClient(url) {
    const repo = new Repo({ network: [new WebSocketClientAdapter(url)] });
    const client = { repo, storageId: null, disconnections: 0 };
    repo.networkSubsystem.on("peer-disconnected", () => {
        client.disconnections += 1;
    });
    const deadline = performance.now() + 20_000;
    while (repo.peers.length === 0) {
        if (performance.now() > deadline) throw new Error(`a client repo could not join the sync server at ${url}`);
        await sleep(5);
    }
    client.storageId = repo.getStorageIdOfPeer(repo.peers[0]);
    if (!client.storageId) throw new Error("the sync server announced no storage id");
    return client;
}

async function runAutomergeRepo(root, settings) {
    const directory = path.join(root, "automerge-repo-data");
    mkdirSync(directory, { recursive: true });
    const logPath = path.join(root, "automerge-repo-server.log");
    const server = fork(fileURLToPath(import.meta.url), ["--serve-automerge-repo", directory], {
        stdio: ["ignore", "pipe", "pipe", "ipc"],
    });
    const log = [];
    server.stdout.on("data", (chunk) => log.push(chunk));
    server.stderr.on("data", (chunk) => log.push(chunk));
    let serverExit = null;
    server.on("exit", (code, signal) => {
        serverExit = { code, signal };
    });
    const result = { system: "automerge-repo", notes: [] };
    const ask = (message, answerType) =>
        new Promise((resolve, reject) => {
            const listener = (answer) => {
                if (answer.type === answerType) {
                    server.off("message", listener);
                    resolve(answer);
                }
            };
            server.on("message", listener);
            server.once("exit", () => reject(new Error("the automerge-repo sync server exited")));
            if (message) server.send(message);
        });
    const clients = [];
    let reader = null;
    try {
        const { port } = await ask(null, "listening");
        const url = `ws://127.0.0.1:${port}`;
        say(`automerge-repo: sync server on ${url} (pid ${server.pid}), storage in ${directory}`);

        // Throughput: closed-loop clients, each its own repo and websocket.
        const connecting = performance.now();
        const joins = [];
        for (let index = 0; index < settings.clients; index += 1) {
            const joining = performance.now();
            clients.push(await automergeClient(url));
            joins.push((performance.now() - joining) / 1000);
        }
        const connectSeconds = (performance.now() - connecting) / 1000;
        const slowest = Math.max(...joins);
        say(
            `automerge-repo: ${settings.clients} client repos joined in ${connectSeconds.toFixed(1)} s ` +
                `(the slowest in ${slowest.toFixed(1)} s, ${joins.filter((seconds) => seconds > 1).length} over 1 s)`,
        );
        const writers = clients.map(({ repo, storageId }) => {
            const trackers = [];
            const handles = [];
            return {
                write: (operation) => {
                    if (operation.kind === "create") {
                        const handle = repo.create(operation.record);
                        handles.push(handle);
                        trackers.push(serverTracker(handle, storageId));
                        return trackers[trackers.length - 1].changed();
                    }
                    handles[operation.target].change((record) => {
                        record.visits = operation.visits;
                    });
                    return trackers[operation.target].changed();
                },
            };
        });
        say(`automerge-repo: ${settings.clients} clients writing for ${settings.warmup} + ${settings.seconds} s`);
        result.throughput = await closedLoop(
            writers,
            settings,
            { load_generator: process.pid, sync_server: server.pid },
            "sync_server",
        );
        result.throughput.clients_join_seconds = connectSeconds;
        result.throughput.slowest_join_seconds = slowest;
        result.throughput.disconnections = clients.reduce((sum, client) => sum + client.disconnections, 0);
        say(
            `automerge-repo: ${result.throughput.writes_per_second.toFixed(0)} acknowledged writes/s ` +
                `(client connections the server dropped: ${result.throughput.disconnections})`,
        );
        for (const { repo } of clients) await repo.shutdown();
        clients.length = 0;
        const flushed = await ask({ type: "flush" }, "flushed");
        result.throughput.storage_flush_seconds = flushed.milliseconds / 1000;
        result.throughput.server_documents = flushed.documents;
        result.throughput.storage_bytes = directoryBytes(directory);
        result.throughput.disk_bytes_per_record = result.throughput.storage_bytes / result.throughput.created_total;
        say(`automerge-repo: the server's storage flushed in ${(flushed.milliseconds / 1000).toFixed(1)} s`);

        // Replication latency: a change on client A observed on client B through the server.
        const writer = await automergeClient(url);
        clients.push(writer);
        const writerHandles = [];
        for (let index = 0; index < settings.latencyRecords; index += 1) {
            writerHandles.push(writer.repo.create({ name: NAMES[index % NAMES.length], city: CITIES[index % CITIES.length], tier: "gold", visits: 0 }));
        }
        const trackers = new Map(writerHandles.map((handle) => [handle.documentId, serverTracker(handle, writer.storageId)]));
        await Promise.all([...trackers.values()].map((tracker) => tracker.changed()));
        // Client B runs in its own thread, as a second device would (each Concord node is its own
        // process); it reports each value it sees with a timestamp on the shared clock.
        reader = new Worker(fileURLToPath(import.meta.url), {
            workerData: { role: "automerge-repo-reader", url, documents: writerHandles.map((handle) => handle.url) },
        });
        let probes = null;
        let readerDisconnections = 0;
        reader.on("message", (message) => {
            if (message.type === "seen") probes?.seen(message.documentId, message.visits, message.when - performance.timeOrigin);
            else if (message.type === "disconnected") readerDisconnections += 1;
            else if (message.type === "log") console.log(message.text);
        });
        await new Promise((resolve, reject) => {
            reader.on("message", (message) => message.type === "ready" && resolve());
            reader.once("error", reject);
            reader.once("exit", () => reject(new Error("client B's thread exited")));
        });
        const handleById = new Map(writerHandles.map((handle) => [handle.documentId, handle]));
        result.latency = {};
        for (const [index, rate] of settings.rates.entries()) {
            probes = pacedProbes([...handleById.keys()], rate, settings.latencySeconds, (index + 1) * 1e8);
            say(`automerge-repo: patching ${settings.latencyRecords} documents at ${rate}/s for ${settings.latencySeconds} s`);
            const latencyMeter = cpuMeter({ load_generator: process.pid, sync_server: server.pid });
            const measured = await probes.run((documentId, visits) => {
                handleById.get(documentId).change((record) => {
                    record.visits = visits;
                });
                return trackers.get(documentId).changed();
            });
            measured.processes = latencyMeter();
            measured.disconnections = { writer: writer.disconnections, reader: readerDisconnections };
            result.latency[rate] = measured;
            say(`automerge-repo: at ${rate}/s ${latencyLine(measured)}; disconnections so far: A ${writer.disconnections}, B ${readerDisconnections}`);
        }
        result.notes.push("acknowledged = the sync server's heads (sync state, remote-heads event) include the change");
    } catch (error) {
        result.error = String(error?.stack ?? error);
        say(`automerge-repo: stopped: ${error?.message ?? error}`);
    } finally {
        await reader?.terminate();
        for (const { repo } of clients) await repo.shutdown().catch(() => {});
        if (serverExit === null) {
            server.send({ type: "stop" });
            await Promise.race([once(server, "exit"), sleep(5000)]);
            if (serverExit === null) server.kill("SIGKILL");
        }
        writeFileSync(logPath, Buffer.concat(log));
        result.server_log = logPath;
        const serverMessages = new Map();
        for (const line of Buffer.concat(log).toString().split("\n").filter(Boolean)) {
            serverMessages.set(line.slice(0, 300), (serverMessages.get(line.slice(0, 300)) ?? 0) + 1);
        }
        result.server_messages = Object.fromEntries(serverMessages);
        if (serverExit && serverExit.code !== 0 && serverExit.code !== null) {
            result.notes.push(`the sync server exited with code ${serverExit.code}`);
        }
    }
    return result;
}

// ---------------------------------------------------------------------------------------------
// Concord.

function concordCommand(settings, argumentList) {
    return execFileSync(settings.concord, argumentList, { stdio: ["ignore", "pipe", "pipe"] }).toString();
}

async function waitForFile(file, child, timeoutMs = 30_000) {
    const deadline = performance.now() + timeoutMs;
    while (!existsSync(file)) {
        if (child.exitCode !== null) throw new Error(`the node exited (code ${child.exitCode}) before writing ${file}`);
        if (performance.now() > deadline) throw new Error(`${file} did not appear within ${timeoutMs} ms`);
        await sleep(20);
    }
    return readFileSync(file, "utf8").trim();
}

/** Starts `concord start` as a child process; resolves with its API and peer addresses. */
async function startConcordNode(root, certs, name, seeds, settings) {
    const dataDirectory = path.join(root, name);
    const logPath = path.join(root, `${name}.log`);
    const argumentList = [
        "start", "--name", name, "--data-dir", dataDirectory,
        "--listen-api", "127.0.0.1:0", "--listen-peer", "127.0.0.1:0",
        "--certs", certs, "--cluster", "peer-bench",
        ...seeds.flatMap((seed) => ["--peer", seed]),
    ];
    const child = spawn(settings.concord, argumentList, {
        stdio: ["ignore", "ignore", "pipe"],
        env: { ...process.env, NO_COLOR: "1", RUST_LOG: process.env.RUST_LOG ?? "info" },
    });
    const log = [];
    child.stderr.on("data", (chunk) => log.push(chunk));
    const api = `http://${await waitForFile(path.join(dataDirectory, "api.addr"), child)}`;
    const peer = await waitForFile(path.join(dataDirectory, "peer.addr"), child);
    const pool = new Pool(api, {
        connections: settings.clients,
        headersTimeout: ACKNOWLEDGEMENT_TIMEOUT_MS,
        bodyTimeout: ACKNOWLEDGEMENT_TIMEOUT_MS,
    });
    return { name, child, api, peer, pool, log, logPath, dataDirectory };
}

async function stopConcordNode(node) {
    await node.pool.close().catch(() => {});
    if (node.child.exitCode === null && node.child.signalCode === null) {
        node.child.kill("SIGTERM");
        const exited = await Promise.race([once(node.child, "exit").then(() => true), sleep(15_000).then(() => false)]);
        if (!exited) {
            node.child.kill("SIGKILL");
            await once(node.child, "exit");
            return "did not stop within 15 s of SIGTERM; killed";
        }
    }
    writeFileSync(node.logPath, Buffer.concat(node.log));
    return node.child.exitCode === 0 ? null : `exited with code ${node.child.exitCode} signal ${node.child.signalCode}`;
}

async function request(node, method, route, body) {
    const response = await node.pool.request({
        method,
        path: route,
        headers: body === undefined ? {} : { "content-type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.body.text();
    return { status: response.statusCode, text };
}

async function status(node) {
    const { status: code, text } = await request(node, "GET", "/v1/status");
    if (code !== 200) throw new Error(`${node.name}: GET /v1/status answered ${code}: ${text}`);
    return JSON.parse(text);
}

/** Waits until both nodes hold the same state (equal digests, nothing lacking either way). */
async function concordConverged(nodes, timeoutMs) {
    const started = performance.now();
    while (performance.now() - started < timeoutMs) {
        const statuses = await Promise.all(nodes.map(status));
        const digestsEqual = statuses.every((one) => one.digest === statuses[0].digest);
        const nothingLacking = statuses.every((one) =>
            one.peers.every((peer) => peer.connected && peer.peer_lacks === 0 && peer.we_lack === 0),
        );
        if (digestsEqual && nothingLacking && statuses.every((one) => one.peers.length > 0)) {
            return (performance.now() - started) / 1000;
        }
        await sleep(100);
    }
    throw new Error(`the Concord nodes did not converge within ${timeoutMs / 1000} s`);
}

async function write(node, method, route, body) {
    const answer = await request(node, method, route, body);
    if (answer.status !== 200) throw new Error(`${method} answered ${answer.status}: ${answer.text.slice(0, 160)}`);
}

async function runConcord(root, settings) {
    const result = { system: "concord", notes: [] };
    const certs = path.join(root, "certs");
    const nodes = [];
    try {
        concordCommand(settings, ["cert", "ca", "--dir", certs, "--cluster", "peer-bench"]);
        for (const name of ["alpha", "beta"]) {
            concordCommand(settings, ["cert", "node", "--dir", certs, "--name", name, "--ip", "127.0.0.1"]);
        }
        const alpha = await startConcordNode(root, certs, "alpha", [], settings);
        nodes.push(alpha);
        const beta = await startConcordNode(root, certs, "beta", [alpha.peer], settings);
        nodes.push(beta);
        say(`concord: nodes alpha (${alpha.api}, pid ${alpha.child.pid}) and beta (${beta.api}, pid ${beta.child.pid}) on loopback`);
        await concordConverged(nodes, 30_000);

        // Throughput: every client writes to alpha; beta replicates live.
        const writers = Array.from({ length: settings.clients }, (_, client) => ({
            write: (operation) => {
                const id = operation.kind === "create" ? `c${client}-${operation.number}` : `c${client}-${operation.target}`;
                const route = `/v1/collections/customers/records/${id}`;
                return operation.kind === "create"
                    ? write(alpha, "PUT", route, operation.record)
                    : write(alpha, "PATCH", route, { visits: operation.visits });
            },
        }));
        say(`concord: ${settings.clients} clients writing to alpha for ${settings.warmup} + ${settings.seconds} s`);
        result.throughput = await closedLoop(
            writers,
            settings,
            { load_generator: process.pid, alpha: alpha.child.pid, beta: beta.child.pid },
            "alpha",
        );
        say(`concord: ${result.throughput.writes_per_second.toFixed(0)} acknowledged writes/s`);
        result.throughput.replica_catch_up_seconds = await concordConverged(nodes, CATCH_UP_TIMEOUT_MS);
        result.throughput.storage_bytes = directoryBytes(alpha.dataDirectory);
        result.throughput.disk_bytes_per_record = result.throughput.storage_bytes / result.throughput.created_total;
        say(`concord: beta held everything ${result.throughput.replica_catch_up_seconds.toFixed(1)} s after the phase`);

        // Replication latency: a patch at alpha observed on beta's change feed.
        const ids = Array.from({ length: settings.latencyRecords }, (_, index) => `r${index}`);
        for (let start = 0; start < ids.length; start += settings.clients) {
            await Promise.all(
                ids.slice(start, start + settings.clients).map((id, offset) =>
                    write(alpha, "PUT", `/v1/collections/latency/records/${id}`, {
                        name: NAMES[(start + offset) % NAMES.length],
                        city: CITIES[(start + offset) % CITIES.length],
                        tier: "gold",
                        visits: 0,
                    }),
                ),
            );
        }
        await concordConverged(nodes, CATCH_UP_TIMEOUT_MS);
        let probes = null;
        const since = (await status(beta)).feed_sequence;
        const feed = await beta.pool.request({
            method: "GET",
            path: `/v1/changes?since=${since}`,
            headers: { accept: "application/x-ndjson" },
            bodyTimeout: 0,
        });
        if (feed.statusCode !== 200) throw new Error(`beta's change feed answered ${feed.statusCode}`);
        const following = (async () => {
            let buffer = "";
            feed.body.setEncoding("utf8");
            try {
                for await (const chunk of feed.body) {
                    const now = performance.now();
                    buffer += chunk;
                    let end;
                    while ((end = buffer.indexOf("\n")) >= 0) {
                        const line = buffer.slice(0, end);
                        buffer = buffer.slice(end + 1);
                        const event = JSON.parse(line);
                        if (event.collection === "latency" && event.value) probes?.seen(event.id, event.value.visits, now);
                    }
                }
            } catch {
                // the feed ends when the body is destroyed below
            }
        })();
        result.latency = {};
        for (const [index, rate] of settings.rates.entries()) {
            await concordConverged(nodes, CATCH_UP_TIMEOUT_MS);
            probes = pacedProbes(ids, rate, settings.latencySeconds, (index + 1) * 1e8);
            say(`concord: patching ${settings.latencyRecords} records at ${rate}/s for ${settings.latencySeconds} s`);
            const latencyMeter = cpuMeter({ load_generator: process.pid, alpha: alpha.child.pid, beta: beta.child.pid });
            const measured = await probes.run((id, visits) =>
                write(alpha, "PATCH", `/v1/collections/latency/records/${id}`, { visits }),
            );
            measured.processes = latencyMeter();
            result.latency[rate] = measured;
            say(`concord: at ${rate}/s ${latencyLine(measured)}`);
        }
        feed.body.destroy();
        await following;
        result.notes.push("acknowledged = the HTTP write answered 200: the change is flushed to alpha's sled store");
    } catch (error) {
        result.error = String(error?.stack ?? error);
        say(`concord: stopped: ${error?.message ?? error}`);
    } finally {
        result.nodes = {};
        for (const node of nodes) {
            const problem = await stopConcordNode(node);
            const lines = Buffer.concat(node.log).toString().split("\n");
            result.nodes[node.name] = {
                log: node.logPath,
                warnings: lines.filter((line) => / WARN /.test(line)).length,
                errors: lines.filter((line) => / ERROR /.test(line)).length,
                stop: problem ?? "stopped cleanly",
            };
            if (problem) result.notes.push(`${node.name} ${problem}`);
        }
    }
    return result;
}

// ---------------------------------------------------------------------------------------------
// The report.

function packageVersions() {
    const versions = {};
    const lock = JSON.parse(readFileSync(path.join(here, "package-lock.json"), "utf8"));
    for (const [location, entry] of Object.entries(lock.packages ?? {})) {
        if (location.startsWith("node_modules/")) versions[location.slice("node_modules/".length)] = entry.version;
    }
    return versions;
}

function machine() {
    let uptime = null;
    try {
        uptime = execFileSync("uptime").toString().trim();
    } catch {
        uptime = `load average ${os.loadavg().map((value) => value.toFixed(2)).join(", ")}`;
    }
    let pressure = null;
    try {
        // The share of time some runnable task waited for a CPU (Linux PSI): other work on the machine.
        pressure = readFileSync("/proc/pressure/cpu", "utf8").split("\n")[0];
    } catch {
        // not every kernel has PSI
    }
    return {
        cpus: os.cpus().length,
        cpu_pressure: pressure,
        cpu_model: os.cpus()[0]?.model,
        memory_gb: Math.round(os.totalmem() / 2 ** 30),
        kernel: os.release(),
        node: process.version,
        uptime,
    };
}

const format = (value, digits = 1) =>
    value === null || value === undefined || Number.isNaN(value)
        ? "–"
        : value >= 100
          ? Math.round(value).toLocaleString("en-US")
          : value < 10
            ? value.toFixed(digits + 1)
            : value.toFixed(digits);

function comparisons(automerge, concord, rates) {
    const rows = [];
    const row = (label, pick, higherIsBetter, unit) => {
        const left = automerge ? pick(automerge) : null;
        const right = concord ? pick(concord) : null;
        const ratio = left && right ? right / left : null;
        const advantage = ratio === null ? null : higherIsBetter ? ratio : 1 / ratio;
        rows.push({ label, unit, automerge_repo: left ?? null, concord: right ?? null, ratio, concord_better: advantage === null ? null : advantage > 1 });
    };
    row("acknowledged writes/s", (side) => side.throughput?.writes_per_second, true, "/s");
    row("write acknowledgement p50", (side) => side.throughput?.acknowledgement_ms.p50, false, "ms");
    row("write acknowledgement p99", (side) => side.throughput?.acknowledgement_ms.p99, false, "ms");
    row("CPU per write, server taking the writes", (side) => side.throughput?.cpu_ms_per_write?.writer, false, "ms");
    row("CPU per write, all servers (+ replica)", (side) => side.throughput?.cpu_ms_per_write?.servers, false, "ms");
    row("all CPU per write (with clients)", (side) => side.throughput?.cpu_ms_per_write?.all, false, "ms");
    row("disk per record after the writes", (side) => side.throughput?.disk_bytes_per_record, false, "bytes");
    for (const rate of rates) {
        row(`replication p50 at ${rate}/s`, (side) => side.latency?.[rate]?.replication_ms.p50, false, "ms");
        row(`replication p99 at ${rate}/s`, (side) => side.latency?.[rate]?.replication_ms.p99, false, "ms");
        row(`replication max at ${rate}/s`, (side) => side.latency?.[rate]?.replication_ms.max, false, "ms");
        row(`writes acknowledged at ${rate}/s offered`, (side) => side.latency?.[rate]?.acknowledged_rate, true, "/s");
    }
    return rows;
}

function table(rows, settings) {
    const header = ["figure", "automerge-repo", "Concord", "Concord / automerge-repo"];
    const lines = rows.map((row) => [
        `${row.label} (${row.unit})`,
        format(row.automerge_repo),
        format(row.concord),
        row.ratio === null ? "–" : `${row.ratio.toFixed(2)}${row.concord_better === null ? "" : row.concord_better ? "  (Concord better)" : "  (Concord worse)"}`,
    ]);
    const widths = header.map((title, column) => Math.max(title.length, ...lines.map((line) => line[column].length)));
    const render = (cells) => cells.map((cell, column) => (column === 0 ? cell.padEnd(widths[column]) : cell.padStart(widths[column]))).join("  ");
    return [
        `${settings.clients} clients, 3 creations : 1 patch, ${settings.seconds} s after ${settings.warmup} s warm-up; latency at ${settings.rates.join(" and ")}/s offered, ${settings.latencySeconds} s each`,
        render(header),
        render(widths.map((width) => "-".repeat(width))),
        ...lines.map(render),
    ].join("\n");
}

async function main() {
    const settings = {
        seconds: Number(options.seconds),
        warmup: Number(options.warmup),
        clients: Number(options.clients),
        rates: options.rates.split(",").map(Number),
        latencySeconds: Number(options["latency-seconds"]),
        latencyRecords: Number(options["latency-records"]),
        concord: path.resolve(options.concord),
    };
    for (const [name, value] of Object.entries(settings)) {
        const numbers = typeof value === "number" ? [value] : Array.isArray(value) ? value : [];
        if (numbers.some((number) => !(Number.isFinite(number) && number > 0))) {
            console.error(`error: --${name} must be a positive number (--rates: a comma-separated list)`);
            process.exit(2);
        }
    }
    const only = options.only;
    if (only && only !== "concord" && only !== "automerge-repo") {
        console.error("error: --only takes concord or automerge-repo");
        process.exit(2);
    }
    if (only !== "automerge-repo" && !existsSync(settings.concord)) {
        console.error(`error: no Concord binary at ${settings.concord}: run cargo build --release, or pass --concord PATH`);
        process.exit(2);
    }
    const root = mkdtempSync(path.join(os.tmpdir(), "concord-peer-"));
    const report = {
        started: new Date().toISOString(),
        settings: { ...settings, workload: "3 creations of a new 4-field record : 1 patch of one field of an earlier record of the same client" },
        machine_before: machine(),
        versions: { ...packageVersions(), concord: only === "automerge-repo" ? null : concordCommand(settings, ["--version"]).trim() },
        systems: {},
    };
    say(`machine: ${report.machine_before.cpus} cores; ${report.machine_before.uptime}`);
    if (report.machine_before.cpu_pressure) say(`CPU pressure: ${report.machine_before.cpu_pressure}`);
    say(`data in ${root}`);
    if (options.order !== "automerge-repo-first" && options.order !== "concord-first") {
        console.error("error: --order takes automerge-repo-first or concord-first");
        process.exit(2);
    }
    const sides = [
        ["automerge-repo", () => runAutomergeRepo(root, settings)],
        ["concord", () => runConcord(root, settings)],
    ];
    if (options.order === "concord-first") sides.reverse();
    for (const [name, run] of sides) {
        if (!only || only === name) report.systems[name] = await run();
    }
    report.machine_after = machine();
    report.library_messages = Object.fromEntries(libraryMessages);
    report.comparison = comparisons(report.systems["automerge-repo"], report.systems.concord, settings.rates);
    const throughput = report.comparison[0];
    const p99Lower = Object.fromEntries(
        settings.rates.map((rate) => {
            const row = report.comparison.find((candidate) => candidate.label === `replication p99 at ${rate}/s`);
            return [rate, row.ratio === null ? null : row.ratio < 1];
        }),
    );
    report.p6 = {
        target: "Concord >= 10x automerge-repo's acknowledged writes/s, and a lower replication p99",
        throughput_ratio: throughput.ratio,
        throughput_met: throughput.ratio === null ? null : throughput.ratio >= 10,
        p99_lower_by_rate: p99Lower,
    };
    say("");
    say(table(report.comparison, settings));
    for (const [name, side] of Object.entries(report.systems)) {
        const processes = side.throughput?.processes;
        if (processes) {
            const cpu = Object.entries(processes).map(([role, usage]) => `${role} ${format(usage.cores, 2)} cores, ${format(usage.rss_mb, 0)} MB`).join("; ");
            say(`${name}, CPU in the measured write window: ${cpu}`);
        }
        if (side.throughput?.failed) say(`${name}: ${side.throughput.failed} writes failed: ${JSON.stringify(side.throughput.failures)}`);
        if (side.error) say(`${name}: ERROR ${side.error.split("\n")[0]}`);
        for (const [text, count] of Object.entries(side.server_messages ?? {})) say(`${name} sync server printed ${count} times: ${text}`);
        for (const note of side.notes ?? []) say(`${name}: ${note}`);
    }
    for (const [text, count] of libraryMessages) say(`printed by a library ${count} times: ${text}`);
    const verdict = (met) => (met === null ? "not measured" : met ? "met" : "not met");
    const p99Verdicts = Object.entries(p99Lower).map(([rate, lower]) => `at ${rate}/s ${verdict(lower)}`).join(", ");
    say(
        `P6: throughput ${throughput.ratio === null ? "–" : throughput.ratio.toFixed(2)}x (target >= 10x: ${verdict(report.p6.throughput_met)}); ` +
            `lower replication p99: ${p99Verdicts}`,
    );
    say(`machine after: ${report.machine_after.uptime}; CPU pressure: ${report.machine_after.cpu_pressure ?? "–"}`);
    if (options.json) {
        writeFileSync(options.json, `${JSON.stringify(report, null, 2)}\n`);
        say(`JSON written to ${options.json}`);
    }
    if (!options.keep) rmSync(root, { recursive: true, force: true });
    else say(`kept ${root}`);
    const failed = Object.values(report.systems).some((side) => side.error);
    process.exit(failed ? 1 : 0);
}

// Dispatch last, once every module-level constant above is initialised.
if (!isMainThread && workerData?.role === "automerge-repo-reader") {
    await automergeReader(workerData);
} else if (options["serve-automerge-repo"] !== undefined) {
    await serveAutomergeRepo(options["serve-automerge-repo"]);
} else {
    await main();
}
