// t/27-tokens-sdk.t: the OpenAI Node SDK (npm "openai", status/node_modules)
// against nginx with a token budget.  Sends chat completions for one key
// until the budget refuses one, and reports, as one JSON line, what the SDK
// saw: each call's status, the x-ratelimit-* headers of its final answer,
// how long it took, and the retry the SDK made on the 429 (its own debug
// log names the wait it took).
//   node t/js/sdk-retry.js <base url> <api key> <max_tokens> <calls>
'use strict';

const OpenAI = require('openai');

async function main() {
    const [base, key, maxTokens, calls] = process.argv.slice(2);
    const client = new OpenAI({ baseURL: base, apiKey: key, maxRetries: 2,
                                timeout: 60000 });
    const out = [];

    for (let i = 0; i < Number(calls); i++) {
        const t0 = Date.now();
        const rec = { call: i };
        try {
            const { data, response } = await client.chat.completions.create({
                model: 'deepseek-chat',
                messages: [{ role: 'user', content: 'hello number ' + i }],
                max_tokens: Number(maxTokens),
            }).withResponse();
            rec.status = response.status;
            rec.usage = data.usage;
            rec.headers = {};
            for (const [k, v] of response.headers.entries()) {
                if (k.startsWith('x-ratelimit-')) {
                    rec.headers[k] = v;
                }
            }
        } catch (e) {
            rec.status = e.status || 0;
            rec.error = String(e.message || e);
        }
        rec.ms = Date.now() - t0;
        out.push(rec);
    }

    process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((e) => {
    process.stderr.write(String(e && e.stack || e) + '\n');
    process.exit(1);
});
