// A Server-Sent Events reader over fetch(), so that the stream carries the same
// Authorization header as every other call (EventSource cannot send one). It resumes
// with Last-Event-ID after a dropped connection, as EventSource would.

import { authHeaders, failure } from "./api.js";

const RETRY_MS = 1000;

// Calls onEvent({type, id, data}) for each event until a `done` event, an API error
// (thrown) or signal aborts.
export async function readEvents(url, onEvent, signal) {
  let lastId = null;
  for (;;) {
    const headers = authHeaders();
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    let response;
    try {
      response = await fetch(url, { headers, signal });
    } catch (e) {
      if (signal.aborted) return;
      await sleep(RETRY_MS);
      continue;
    }
    if (!response.ok) throw await failure(response);
    let finished = false;
    try {
      finished = await parse(response.body, (event) => {
        if (event.id !== null) lastId = event.id;
        onEvent(event);
        return event.type === "done";
      });
    } catch (e) {
      if (signal.aborted) return;
    }
    if (finished || signal.aborted) return;
    await sleep(RETRY_MS);
  }
}

// Parses the text/event-stream format; returns true once handle() returned true.
async function parse(body, handle) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let id = null;
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      let line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (data.length) {
          if (handle({ type: type || "message", id, data: data.join("\n") })) {
            reader.cancel().catch(() => {});
            return true;
          }
        }
        type = "";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let rest = colon < 0 ? "" : line.slice(colon + 1);
      if (rest.startsWith(" ")) rest = rest.slice(1);
      if (field === "event") type = rest;
      else if (field === "data") data.push(rest);
      else if (field === "id") id = rest;
    }
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
