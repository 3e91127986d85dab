// A small Markdown renderer that builds DOM nodes and never parses HTML: every piece of
// model text reaches the page through textContent or a text node, so a model that writes
// <script>, <img onerror=...> or a javascript: link shows those characters and nothing runs.
//
// Blocks: fenced code (``` or ~~~, also unclosed while an answer streams), ATX headings,
// paragraphs, block quotes, bullet and numbered lists (nested by indentation), thematic
// breaks and pipe tables. Inline: `code`, **strong**, *emphasis* (and the _ forms), links
// and bare URLs (http and https only, opened with rel="noopener noreferrer"), backslash
// escapes and line breaks.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+(.*))?$/;
const TABLE_DIVIDER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

/** Renders `text` as a DocumentFragment of safe DOM nodes. */
export function renderMarkdown(text) {
    const fragment = document.createDocumentFragment();
    renderBlocks(String(text ?? "").replace(/\r\n?/g, "\n").split("\n"), fragment, 0);
    return fragment;
}

function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
}

function isBlank(line) {
    return /^\s*$/.test(line);
}

function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)
        || (LIST_ITEM.test(line) && LIST_ITEM.exec(line)[4] !== undefined);
}

function renderBlocks(lines, parent, depth) {
    if (depth > 12) { // nesting this deep is not prose: show it as it is
        parent.append(element("p", null, lines.join("\n")));
        return;
    }
    let i = 0;
    while (i < lines.length) {
        const line = lines[i];
        if (isBlank(line)) { i++; continue; }

        let match = FENCE.exec(line);
        if (match) {
            const fence = match[1];
            const body = [];
            i++;
            while (i < lines.length) {
                const closing = lines[i].trim();
                if (closing.startsWith(fence[0].repeat(fence.length)) && /^(`+|~+)$/.test(closing) && closing[0] === fence[0]) { i++; break; }
                body.push(lines[i]);
                i++;
            }
            parent.append(codeBlock(body.join("\n"), match[2]));
            continue;
        }

        match = HEADING.exec(line);
        if (match) {
            const heading = element(`h${match[1].length}`, "md-heading");
            renderInline(match[2] || "", heading);
            parent.append(heading);
            i++;
            continue;
        }

        if (RULE.test(line)) {
            parent.append(element("hr"));
            i++;
            continue;
        }

        if (QUOTE.test(line)) {
            const quoted = [];
            while (i < lines.length && !isBlank(lines[i])) {
                const inner = QUOTE.exec(lines[i]);
                if (!inner && startsBlock(lines[i])) break;
                quoted.push(inner ? inner[1] : lines[i]);
                i++;
            }
            const quote = element("blockquote");
            renderBlocks(quoted, quote, depth + 1);
            parent.append(quote);
            continue;
        }

        match = LIST_ITEM.exec(line);
        if (match && match[4] !== undefined) {
            i = renderList(lines, i, parent, depth);
            continue;
        }

        if (line.includes("|") && i + 1 < lines.length && TABLE_DIVIDER.test(lines[i + 1]) && lines[i + 1].includes("-")) {
            i = renderTable(lines, i, parent);
            continue;
        }

        const paragraph = [];
        while (i < lines.length && !isBlank(lines[i]) && !(paragraph.length && startsBlock(lines[i]))) {
            paragraph.push(lines[i].trim());
            i++;
        }
        const p = element("p");
        renderInline(paragraph.join("\n"), p);
        parent.append(p);
    }
}

function codeBlock(code, language) {
    const figure = element("div", "code-block");
    const bar = element("div", "code-bar");
    const label = element("span", "code-language", language || "code");
    const copy = element("button", "code-copy", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => {
        navigator.clipboard?.writeText(code).then(() => {
            copy.textContent = "Copied";
            setTimeout(() => { copy.textContent = "Copy"; }, 1500);
        }, () => { copy.textContent = "Copy failed"; });
    });
    bar.append(label, copy);
    const pre = element("pre");
    const codeNode = element("code", null, code);
    const safeLanguage = (language || "").replace(/[^A-Za-z0-9_+-]/g, "");
    if (safeLanguage) codeNode.className = `language-${safeLanguage}`;
    pre.append(codeNode);
    figure.append(bar, pre);
    return figure;
}

function renderList(lines, start, parent, depth) {
    const first = LIST_ITEM.exec(lines[start]);
    const ordered = /\d/.test(first[2]);
    const list = element(ordered ? "ol" : "ul");
    if (ordered) {
        const number = parseInt(first[2], 10);
        if (number !== 1) list.start = number;
    }
    const bulletKind = ordered ? first[2].slice(-1) : first[2];
    let i = start;
    let loose = false;
    const items = [];
    while (i < lines.length) {
        const match = LIST_ITEM.exec(lines[i]);
        if (!match || match[4] === undefined) break;
        const kind = ordered ? match[2].slice(-1) : match[2];
        if (/\d/.test(match[2]) !== ordered || kind !== bulletKind) break;
        const indent = match[1].length + match[2].length + (match[3].length - match[4].length);
        const body = [match[4]];
        i++;
        let sawBlank = false;
        while (i < lines.length) {
            const next = lines[i];
            if (isBlank(next)) { sawBlank = true; body.push(""); i++; continue; }
            const leading = next.match(/^ */)[0].length;
            if (leading >= Math.min(indent, 4) && leading > 0) {
                body.push(next.slice(Math.min(leading, indent)));
                i++;
                continue;
            }
            if (sawBlank || LIST_ITEM.test(next) || startsBlock(next)) break;
            body.push(next); // a lazy continuation of the item's paragraph
            i++;
        }
        while (body.length && isBlank(body[body.length - 1])) body.pop();
        if (sawBlank && i < lines.length && LIST_ITEM.test(lines[i])) loose = true;
        items.push(body);
    }
    for (const body of items) {
        const item = element("li");
        const holder = document.createDocumentFragment();
        renderBlocks(body, holder, depth + 1);
        const only = holder.firstChild;
        if (!loose && only && only.nodeName === "P") {
            // A tight item: its first paragraph's inline content goes straight in the <li>.
            while (only.firstChild) item.append(only.firstChild);
            only.remove();
        }
        item.append(holder);
        list.append(item);
    }
    parent.append(list);
    return i;
}

function splitRow(line) {
    let row = line.trim();
    if (row.startsWith("|")) row = row.slice(1);
    if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
    const cells = [];
    let cell = "";
    for (let k = 0; k < row.length; k++) {
        if (row[k] === "\\" && row[k + 1] === "|") { cell += "|"; k++; continue; }
        if (row[k] === "|") { cells.push(cell.trim()); cell = ""; continue; }
        cell += row[k];
    }
    cells.push(cell.trim());
    return cells;
}

function renderTable(lines, start, parent) {
    const header = splitRow(lines[start]);
    const aligns = splitRow(lines[start + 1]).map((spec) => {
        const left = spec.startsWith(":"), right = spec.endsWith(":");
        return left && right ? "center" : right ? "right" : left ? "left" : "";
    });
    const wrapper = element("div", "table-wrap");
    const table = element("table");
    const head = element("thead");
    const headRow = element("tr");
    header.forEach((text, column) => {
        const cell = element("th");
        if (aligns[column]) cell.className = `align-${aligns[column]}`;
        renderInline(text, cell);
        headRow.append(cell);
    });
    head.append(headRow);
    table.append(head);
    const body = element("tbody");
    let i = start + 2;
    while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
        const row = element("tr");
        const cells = splitRow(lines[i]);
        for (let column = 0; column < header.length; column++) {
            const cell = element("td");
            if (aligns[column]) cell.className = `align-${aligns[column]}`;
            renderInline(cells[column] ?? "", cell);
            row.append(cell);
        }
        body.append(row);
        i++;
    }
    table.append(body);
    wrapper.append(table);
    parent.append(wrapper);
    return i;
}

/** A link target this page will follow: absolute http or https only. */
export function safeURL(candidate) {
    try {
        const url = new URL(candidate);
        return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch {
        return null;
    }
}

function link(href, parent) {
    const a = element("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    parent.append(a);
    return a;
}

const PUNCTUATION = /[!-/:-@[-`{-~]/;
const WORD = /[\p{L}\p{N}]/u;

/** Appends the inline Markdown of `text` to `parent` as text nodes and elements. */
export function renderInline(text, parent, depth = 0) {
    let plain = "";
    const flush = () => {
        if (plain) parent.append(document.createTextNode(plain));
        plain = "";
    };
    if (depth > 8) { parent.append(document.createTextNode(text)); return; }
    let i = 0;
    while (i < text.length) {
        const c = text[i];

        if (c === "\\" && i + 1 < text.length && PUNCTUATION.test(text[i + 1])) {
            plain += text[i + 1];
            i += 2;
            continue;
        }
        if (c === "\n") {
            flush();
            parent.append(element("br"));
            i++;
            continue;
        }
        if (c === "`") {
            const run = text.slice(i).match(/^`+/)[0];
            const end = text.indexOf(run, i + run.length);
            if (end > 0 && text[end + run.length] !== "`") {
                flush();
                let code = text.slice(i + run.length, end).replace(/\n/g, " ");
                if (/^ .* $/.test(code) && code.trim()) code = code.slice(1, -1);
                parent.append(element("code", "md-code", code));
                i = end + run.length;
                continue;
            }
            plain += run;
            i += run.length;
            continue;
        }
        if ((c === "*" || c === "_") && text[i + 1] === c) {
            const closing = findClosing(text, i + 2, c + c);
            if (closing > 0) {
                flush();
                const strong = element("strong");
                renderInline(text.slice(i + 2, closing), strong, depth + 1);
                parent.append(strong);
                i = closing + 2;
                continue;
            }
        }
        if (c === "*" || c === "_") {
            const opensWord = i + 1 < text.length && !/\s/.test(text[i + 1]);
            const intraword = c === "_" && i > 0 && WORD.test(text[i - 1]);
            if (opensWord && !intraword) {
                const closing = findClosing(text, i + 1, c);
                if (closing > 0) {
                    flush();
                    const em = element("em");
                    renderInline(text.slice(i + 1, closing), em, depth + 1);
                    parent.append(em);
                    i = closing + 1;
                    continue;
                }
            }
        }
        if (c === "[") {
            const parsed = parseLink(text, i);
            if (parsed) {
                flush();
                const href = safeURL(parsed.target);
                if (href) {
                    renderInline(parsed.label, link(href, parent), depth + 1);
                } else {
                    // Not a web link (javascript:, data:, a relative path): its text, inert.
                    renderInline(parsed.label, parent, depth + 1);
                }
                i = parsed.end;
                continue;
            }
        }
        if ((c === "h" || c === "H") && (i === 0 || !WORD.test(text[i - 1]))) {
            const bare = text.slice(i).match(/^https?:\/\/[^\s<>"'`]+/i);
            if (bare) {
                let url = bare[0].replace(/[.,;:!?*_~]+$/, "");
                while (url.endsWith(")") && (url.match(/\(/g) || []).length < (url.match(/\)/g) || []).length) url = url.slice(0, -1);
                const href = safeURL(url);
                if (href) {
                    flush();
                    link(href, parent).textContent = url;
                    i += url.length;
                    continue;
                }
            }
        }
        plain += c;
        i++;
    }
    flush();
}

/** Index of the closing `marker` for emphasis opened before `from`, or -1. */
function findClosing(text, from, marker) {
    let i = from;
    while (i < text.length) {
        if (text[i] === "\\") { i += 2; continue; }
        if (text[i] === "`") { // emphasis never closes inside a code span
            const run = text.slice(i).match(/^`+/)[0];
            const end = text.indexOf(run, i + run.length);
            i = end > 0 ? end + run.length : i + run.length;
            continue;
        }
        if (text.startsWith(marker, i) && i > from && !/\s/.test(text[i - 1])) {
            const after = text[i + marker.length];
            const doubled = marker.length === 1 && after === marker; // `*` inside `**`
            const intraword = marker[0] === "_" && after !== undefined && WORD.test(after);
            if (!doubled && !intraword) return i;
            if (doubled) { i += 2; continue; }
        }
        i++;
    }
    return -1;
}

/** `[label](target)` at `start`: {label, target, end}, or null. */
function parseLink(text, start) {
    let depth = 0;
    let i = start;
    for (; i < text.length; i++) {
        if (text[i] === "\\") { i++; continue; }
        if (text[i] === "[") depth++;
        else if (text[i] === "]" && --depth === 0) break;
    }
    if (i >= text.length || text[i + 1] !== "(") return null;
    const label = text.slice(start + 1, i);
    let j = i + 2;
    let parens = 0;
    for (; j < text.length; j++) {
        if (text[j] === "(") parens++;
        else if (text[j] === ")" && parens-- === 0) break;
        else if (text[j] === "\n") return null;
    }
    if (j >= text.length) return null;
    let target = text.slice(i + 2, j).trim();
    const title = target.match(/^(\S+)\s+["'(].*["')]$/);
    if (title) target = title[1];
    if (target.startsWith("<") && target.endsWith(">")) target = target.slice(1, -1);
    return { label, target, end: j + 1 };
}
