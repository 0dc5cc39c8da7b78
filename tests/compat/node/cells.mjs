// The Node clients' cells (openai for Node, the Vercel AI SDK), run in one process per mode.
//
//   node cells.mjs CONFIG.json OUT.json
//
// CONFIG: {mode, api_base, api_key, model, cells: ["client.feature.mode", ...]}. OUT gets
// {cell: {ok, text, chunks, data, tool_calls, error}} like tests/compat/py_runner.py, and the
// same prompts (with the cell's marker) and tool result, so the Python tests check both alike.
//
// Egress mode: the process has HTTPS_PROXY and NODE_EXTRA_CA_CERTS set, as a user's app would.
// Node's fetch ignores HTTPS_PROXY, so, as its users must, we give the clients a fetch that goes
// through undici's EnvHttpProxyAgent (which reads HTTPS_PROXY/NO_PROXY).
import { readFileSync, writeFileSync } from "node:fs";

import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import OpenAI from "openai";
import { zodResponseFormat, zodTextFormat } from "openai/helpers/zod";
import { z } from "zod";

const [configPath, outPath] = process.argv.slice(2);
const config = JSON.parse(readFileSync(configPath, "utf8"));

// Handed to each client (their documented `fetch` option), not set as the global dispatcher:
// node_no_agent's cell shows what Node's own fetch does with HTTPS_PROXY.
let fetchImpl = globalThis.fetch;
if (process.env.HTTPS_PROXY) {
  const undici = await import("undici");
  const dispatcher = new undici.EnvHttpProxyAgent();
  fetchImpl = (url, init) => undici.fetch(url, { ...init, dispatcher });
}

const City = z.object({ name: z.string(), population: z.number().int() });
const weatherParameters = {
  type: "object",
  properties: { city: { type: "string" } },
  required: ["city"],
  additionalProperties: false,
};

function target(cell) {
  const marker = `compat ${cell}`;
  return {
    marker,
    prompt: `Say hello. [${marker}]`,
    toolPrompt: `What is the weather in Paris? Use the tool. [${marker}]`,
    toolResult: `sunny-${cell}`,
    schemaPrompt: `Describe a city. [${marker}]`,
  };
}

// The final response's text (the stream helper's final object has no output_text shortcut).
const outputText = (response) =>
  response.output
    .filter((item) => item.type === "message")
    .flatMap((item) => item.content)
    .filter((part) => part.type === "output_text")
    .map((part) => part.text)
    .join("");

const sdk = () =>
  new OpenAI({ baseURL: config.api_base, apiKey: config.api_key, maxRetries: 0, fetch: fetchImpl });
const provider = () =>
  createOpenAI({ baseURL: config.api_base, apiKey: config.api_key, fetch: fetchImpl });
const model = config.model;
const user = (content) => [{ role: "user", content }];

const CELLS = {
  // -- openai (Node) ---------------------------------------------------------------------------
  "node_openai.chat": async (t) => {
    const r = await sdk().chat.completions.create({ model, messages: user(t.prompt) });
    return { text: r.choices[0].message.content ?? "" };
  },
  "node_openai.stream": async (t) => {
    const out = { text: "", chunks: 0 };
    const stream = await sdk().chat.completions.create({
      model,
      messages: user(t.prompt),
      stream: true,
    });
    for await (const chunk of stream) {
      const piece = chunk.choices[0]?.delta?.content;
      if (piece) {
        out.text += piece;
        out.chunks += 1;
      }
    }
    return out;
  },
  "node_openai.tools": async (t) => {
    const client = sdk();
    const tools = [
      { type: "function", function: { name: "get_weather", parameters: weatherParameters } },
    ];
    const messages = user(t.toolPrompt);
    let toolCalls = 0;
    for (let i = 0; i < 5; i++) {
      const r = await client.chat.completions.create({ model, messages, tools });
      const message = r.choices[0].message;
      if (!message.tool_calls?.length) return { text: message.content ?? "", tool_calls: toolCalls };
      messages.push(message);
      for (const call of message.tool_calls) {
        JSON.parse(call.function.arguments);
        toolCalls += 1;
        messages.push({ role: "tool", tool_call_id: call.id, content: t.toolResult });
      }
    }
    throw new Error("the loop did not end in a text answer");
  },
  "node_openai.structured": async (t) => {
    const r = await sdk().chat.completions.parse({
      model,
      messages: user(t.schemaPrompt),
      response_format: zodResponseFormat(City, "city"),
    });
    return { data: City.parse(r.choices[0].message.parsed) };
  },
  "node_openai.responses": async (t) => {
    const r = await sdk().responses.create({ model, input: t.prompt });
    return { text: r.output_text };
  },
  "node_openai.responses_stream": async (t) => {
    const out = { text: "", chunks: 0 };
    const stream = sdk().responses.stream({ model, input: t.prompt });
    for await (const event of stream) {
      if (event.type === "response.output_text.delta") {
        out.text += event.delta;
        out.chunks += 1;
      }
    }
    const final = outputText(await stream.finalResponse());
    if (final !== out.text) throw new Error(`final response ${final} != streamed ${out.text}`);
    return out;
  },
  "node_openai.responses_tools": async (t) => {
    const client = sdk();
    const tools = [{ type: "function", name: "get_weather", parameters: weatherParameters }];
    const input = user(t.toolPrompt);
    let toolCalls = 0;
    for (let i = 0; i < 5; i++) {
      const r = await client.responses.create({ model, input, tools });
      const calls = r.output.filter((item) => item.type === "function_call");
      if (!calls.length) return { text: r.output_text, tool_calls: toolCalls };
      input.push(...r.output);
      for (const call of calls) {
        JSON.parse(call.arguments);
        toolCalls += 1;
        input.push({ type: "function_call_output", call_id: call.call_id, output: t.toolResult });
      }
    }
    throw new Error("the loop did not end in a text answer");
  },
  "node_openai.responses_structured": async (t) => {
    const r = await sdk().responses.parse({
      model,
      input: t.schemaPrompt,
      text: { format: zodTextFormat(City, "city") },
    });
    return { data: City.parse(r.output_parsed) };
  },

  // -- openai (Node) as an app that sets HTTPS_PROXY but installs no agent: Node's own fetch
  "node_no_agent.chat": async (t) => {
    const client = new OpenAI({ baseURL: config.api_base, apiKey: config.api_key, maxRetries: 0 });
    const r = await client.chat.completions.create({ model, messages: user(t.prompt) });
    return { text: r.choices[0].message.content ?? "" };
  },

  // -- Vercel AI SDK: provider.chat(model) = chat completions, provider(model) = Responses -----
  ...vercel("", (p) => p.chat(model)),
  ...vercel("responses_", (p) => p(model)),
};

function vercel(prefix, pick) {
  const feature = (name) => `vercel_ai.${prefix ? (name === "chat" ? "responses" : prefix + name) : name}`;
  return {
    [feature("chat")]: async (t) => {
      const r = await generateText({ model: pick(provider()), prompt: t.prompt, maxRetries: 0 });
      return { text: r.text };
    },
    [feature("stream")]: async (t) => {
      const out = { text: "", chunks: 0 };
      let failure;
      const r = streamText({
        model: pick(provider()),
        prompt: t.prompt,
        maxRetries: 0,
        onError: ({ error }) => {
          failure = error;
        },
      });
      for await (const piece of r.textStream) {
        out.text += piece;
        out.chunks += 1;
      }
      if (failure) throw failure;
      return out;
    },
    [feature("tools")]: async (t) => {
      let toolCalls = 0;
      const r = await generateText({
        model: pick(provider()),
        prompt: t.toolPrompt,
        maxRetries: 0,
        stopWhen: stepCountIs(5),
        tools: {
          get_weather: tool({
            description: "The current weather in a city.",
            inputSchema: z.object({ city: z.string() }),
            execute: async () => {
              toolCalls += 1;
              return t.toolResult;
            },
          }),
        },
      });
      return { text: r.text, tool_calls: toolCalls };
    },
    [feature("structured")]: async (t) => {
      const r = await generateObject({
        model: pick(provider()),
        schema: City,
        prompt: t.schemaPrompt,
        maxRetries: 0,
      });
      return { data: r.object };
    },
  };
}

const results = {};
for (const cell of config.cells) {
  const [client, featureName] = cell.split(".");
  const started = Date.now();
  try {
    const fn = CELLS[`${client}.${featureName}`];
    if (!fn) throw new Error(`no such cell: ${client}.${featureName}`);
    const out = await fn(target(cell));
    results[cell] = { ok: true, text: "", chunks: 0, data: null, tool_calls: 0, ...out };
  } catch (e) {
    let detail = e?.responseBody ? ` body=${String(e.responseBody).slice(0, 300)}` : "";
    for (let cause = e?.cause; cause; cause = cause.cause) detail += ` (cause: ${cause.message ?? cause})`;
    results[cell] = {
      ok: false,
      error: `${e?.name ?? "Error"}: ${e?.message ?? e}${detail}`,
      traceback: String(e?.stack ?? "").slice(0, 2000),
    };
  }
  results[cell].seconds = (Date.now() - started) / 1000;
}
writeFileSync(outPath, JSON.stringify(results, null, 1));
